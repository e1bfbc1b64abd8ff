"""Shut the clone down in order: the ACPI power button, and a timeout ladder behind it.

First, through the clone's guest agent if it has one, its network filesystems are found
and detached (:mod:`kvmsnap_plugin.vm.network_fs`): with its network cut, a guest would
otherwise wait on a silent server for as long as the ladder lets it. Rungs: press the
power button; press it again after ``repress_after`` seconds (some guests
miss a press made while they are busy); after as long again, ask the guest agent to power
off, if the clone has one; after ``timeout`` seconds in all, stop the clone hard. Only a
shutdown the guest made itself (QEMU's SHUTDOWN event with reason ``guest-shutdown``)
counts as clean.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.model import ShutdownPolicy, ShutdownResult
from kvmsnap_plugin.vm.guest_agent import GuestAgent
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.network_fs import detach_network_mounts

log = logging.getLogger(__name__)

#: presses of the power button before the guest agent is asked
PRESSES = 2
#: the share of the shutdown timeout the clone's network filesystems may take (at most)
NETWORK_FS_SHARE = 0.25


def shut_down(clone: Machine, policy: ShutdownPolicy,
              agent_socket: Path | None = None) -> ShutdownResult:
    """Run the (paused) clone, press its power button, and wait for it to end."""
    clone.qmp.events()
    clone.qmp.execute("cont")
    ladder = _Ladder(clone, policy, agent_socket)
    network_mounts = detach_network_mounts(agent_socket, policy.detach_network_fs,
                                           budget=policy.timeout * NETWORK_FS_SHARE,
                                           release_for=policy.timeout)
    try:
        reason = ladder.climb()
    finally:
        ladder.close()
    guest_did_it = reason == "guest-shutdown"
    if guest_did_it:
        clone.wait_exit(30)
        clone.ended_by = "guest"
    ended_by = clone.shutdown(powerdown_timeout=0, quit_timeout=10)
    seconds = time.monotonic() - ladder.started
    log.info("clone %s after %.1f s (%s)", "shut down cleanly" if guest_did_it else
             "was stopped", seconds, reason)
    return ShutdownResult(guest_did_it, ended_by, seconds, ladder.presses, reason,
                          ladder.agent_asked, network_mounts)


class _Ladder:
    """The rungs, one at a time, until QEMU reports a shutdown or the time is up."""

    def __init__(self, clone: Machine, policy: ShutdownPolicy,
                 agent_socket: Path | None) -> None:
        self.clone = clone
        self.policy = policy
        self.agent_socket = agent_socket
        self.started = time.monotonic()
        self.deadline = self.started + policy.timeout
        self.next_rung = self.started
        self.presses = 0
        self.agent_asked = False
        self._agent: GuestAgent | None = None

    def climb(self) -> str:
        """Why the clone ended: QEMU's SHUTDOWN reason, or what happened instead."""
        while time.monotonic() < self.deadline:
            if time.monotonic() >= self.next_rung:
                self._next_rung()
            reason = self._wait_for_shutdown()
            if reason is not None:
                return reason
        log.warning("the clone did not shut down within %g s; stopping it hard",
                    self.policy.timeout)
        return f"timed out after {self.policy.timeout:g} s"

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()

    def _next_rung(self) -> None:
        if self.presses < PRESSES:
            _press(self.clone)
            faults.point("clone-shutdown")
            self.presses += 1
            self.next_rung = time.monotonic() + self.policy.repress_after
        elif self.agent_socket and not self.agent_asked:
            self._agent, self.agent_asked = _ask_agent(self.agent_socket), True

    def _wait_for_shutdown(self) -> str | None:
        """QEMU's SHUTDOWN reason, why QEMU is gone without one, or None: still running."""
        remaining = self.deadline - time.monotonic()
        try:
            event = self.clone.qmp.wait_event("SHUTDOWN", min(1.0, max(0.05, remaining)))
        except StepTimeout:
            if self.clone.running():
                return None
            return f"QEMU exited without a shutdown event ({self.clone.stderr_tail()})"
        except KvmsnapError:
            return "QEMU exited without a shutdown event"
        return event.data.get("reason", "unknown")


def _ask_agent(socket_path: Path) -> GuestAgent | None:
    """Ask the guest agent to power the guest off; the client stays open until the guest
    acts (see :meth:`GuestAgent.tell`)."""
    log.info("the power button was not acted on; asking the guest agent to power off")
    agent = GuestAgent(socket_path)
    try:
        agent.tell("guest-shutdown", {"mode": "powerdown"})
        return agent
    except VMError as exc:
        log.warning("the guest agent could not be reached: %s", exc)
        return None


def _press(clone: Machine) -> None:
    log.info("pressing the clone's power button")
    try:
        clone.qmp.execute("system_powerdown")
    except KvmsnapError as exc:  # it may be on its way out already
        log.debug("system_powerdown: %s", exc)
