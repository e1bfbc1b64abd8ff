"""Shut the clone down in order: the ACPI power button, and a timeout ladder behind it.

Rungs: press the power button; press it again after ``repress_after`` seconds (some guests
miss a press made while they are busy); after as long again, ask the guest agent to power
off, if the clone has one; after ``timeout`` seconds in all, stop the clone hard. Only a
shutdown the guest made itself (QEMU's SHUTDOWN event with reason ``guest-shutdown``)
counts as clean.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError, StepTimeout
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.model import ShutdownPolicy, ShutdownResult
from kvmsnap_plugin.vm.machine import Machine

log = logging.getLogger("kvmsnap")






def shut_down(clone: Machine, policy: ShutdownPolicy,
              agent_socket: Path | None = None) -> ShutdownResult:
    """Run the (paused) clone, press its power button, and wait for it to end."""
    clone.qmp.events()
    clone.qmp.execute("cont")
    started = time.monotonic()
    presses = 0
    agent: socket.socket | None = None
    agent_asked = False
    reason = "no shutdown event"
    next_press = started
    deadline = started + policy.timeout
    while time.monotonic() < deadline:
        if time.monotonic() >= next_press and presses < 2:
            _press(clone)
            faults.point("clone-shutdown")
            presses += 1
            next_press = time.monotonic() + policy.repress_after
        elif time.monotonic() >= next_press and agent_socket and not agent_asked:
            agent, agent_asked = _ask_agent(agent_socket), True
        try:
            event = clone.qmp.wait_event("SHUTDOWN", min(1.0, max(0.05, deadline -
                                                                  time.monotonic())))
            reason = event.data.get("reason", "unknown")
            break
        except StepTimeout:
            if not clone.running():
                reason = f"QEMU exited without a shutdown event ({clone.stderr_tail()})"
                break
            continue
        except KvmsnapError:
            reason = "QEMU exited without a shutdown event"
            break
    else:
        log.warning("the clone did not shut down within %g s; stopping it hard",
                    policy.timeout)
        reason = f"timed out after {policy.timeout:g} s"
    if agent is not None:
        agent.close()
    guest_did_it = reason == "guest-shutdown"
    if guest_did_it:
        clone.wait_exit(30)
        clone.ended_by = "guest"
    ended_by = clone.shutdown(powerdown_timeout=0, quit_timeout=10)
    seconds = time.monotonic() - started
    log.info("clone %s after %.1f s (%s)", "shut down cleanly" if guest_did_it else
             "was stopped", seconds, reason)
    return ShutdownResult(guest_did_it, ended_by, seconds, presses, reason, agent_asked)


def _ask_agent(socket_path: Path) -> socket.socket | None:
    """Ask the guest agent (qemu-ga protocol) to power the guest off.

    Returns the open channel: it must stay open until the guest acts, since a virtio-serial
    port drops what the host sent once the host side closes.
    """
    log.info("the power button was not acted on; asking the guest agent to power off")
    request = {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}
    channel = socket.socket(socket.AF_UNIX)
    try:
        channel.settimeout(5)
        channel.connect(str(socket_path))
        channel.sendall(json.dumps(request).encode() + b"\n")
        return channel
    except OSError as exc:
        channel.close()
        log.warning("the guest agent could not be reached: %s", exc)
        return None


def _press(clone: Machine) -> None:
    log.info("pressing the clone's power button")
    try:
        clone.qmp.execute("system_powerdown")
    except KvmsnapError as exc:  # it may be on its way out already
        log.debug("system_powerdown: %s", exc)
