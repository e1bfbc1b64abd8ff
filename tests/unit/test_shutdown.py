"""The clone's shutdown ladder, driven with a fake machine: no QEMU, fractions of seconds."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.errors import StepTimeout, VMError
from kvmsnap_plugin.vm.clone import Clone
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.qmp import Event
from kvmsnap_plugin.vm.shutdown import shut_down


@dataclass(frozen=True)
class Policy:
    """ShutdownPolicy's fields, without its one-second floor."""

    timeout: float
    repress_after: float
    detach_network_fs: bool = True


class FakeQmp:
    """A guest that shuts down after ``obeys`` presses (never if None)."""

    def __init__(self, machine: FakeMachine, obeys: int | None) -> None:
        self.machine = machine
        self.obeys = obeys
        self.commands: list[tuple[float, str]] = []
        self.pending: list[Event] = []
        self.lost = False  # the connection drops: QEMU is gone

    def events(self) -> list[Event]:
        return []

    def execute(self, command: str, arguments: dict | None = None, *,
                timeout: float | None = None) -> dict:
        self.commands.append((time.monotonic(), command))
        if command == "system_powerdown" and self.obeys is not None and \
                len(self.presses()) >= self.obeys:
            self.pending.append(Event("SHUTDOWN", {"reason": "guest-shutdown"}, time.time()))
        return {}

    def wait_event(self, names: str, timeout: float) -> Event:
        if self.lost:
            raise VMError("QMP connection lost while waiting for an event")
        if self.pending:
            return self.pending.pop(0)
        time.sleep(min(timeout, 0.01))
        raise StepTimeout(f"no {names} event within {timeout:g} s")

    def presses(self) -> list[float]:
        return [when for when, command in self.commands if command == "system_powerdown"]


class FakeMachine:
    """What shut_down uses of a Machine."""

    def __init__(self, obeys: int | None = 1) -> None:
        self.qmp = FakeQmp(self, obeys)
        self.alive = True
        self.ended_by: str | None = None
        self.shutdown_calls: list[tuple[float, float]] = []

    def running(self) -> bool:
        return self.alive

    def stderr_tail(self) -> str:
        return "" if self.alive else "qemu: terminating on signal 15"

    def wait_exit(self, timeout: float) -> bool:
        self.alive = False
        return True

    def shutdown(self, powerdown_timeout: float = 20.0, quit_timeout: float = 5.0) -> str:
        self.shutdown_calls.append((powerdown_timeout, quit_timeout))
        if self.ended_by is None:
            self.ended_by = "quit"
        self.alive = False
        return self.ended_by


def test_a_guest_that_obeys_the_first_press_is_clean():
    clone = FakeMachine(obeys=1)
    result = shut_down(clone, Policy(timeout=2.0, repress_after=0.5))
    assert result.clean and result.reason == "guest-shutdown"
    assert result.presses == 1 and not result.agent_asked
    assert result.ended_by == "guest"
    assert [c for _, c in clone.qmp.commands] == ["cont", "system_powerdown"]
    assert clone.shutdown_calls == [(0, 10)]  # no second power button, only quit if needed


def test_a_guest_that_misses_the_first_press_gets_a_second_one():
    clone = FakeMachine(obeys=2)
    result = shut_down(clone, Policy(timeout=2.0, repress_after=0.1))
    first, second = clone.qmp.presses()
    assert second - first >= 0.1
    assert result.clean and result.presses == 2


def test_a_deaf_guest_gets_two_presses_then_the_agent_then_a_hard_stop(tmp_path):
    agent = _agent_socket(tmp_path / "qga.sock")
    clone = FakeMachine(obeys=None)
    started = time.monotonic()
    result = shut_down(clone, Policy(timeout=0.6, repress_after=0.1), tmp_path / "qga.sock")
    assert time.monotonic() - started >= 0.6
    first, second = clone.qmp.presses()
    assert second - first >= 0.1
    assert result.presses == 2 and result.agent_asked
    assert not result.clean and result.reason == "timed out after 0.6 s"
    assert result.ended_by == "quit"  # the machine's own ladder ended it
    network_fs, _ = agent.accept()  # first, before the button: the look for network mounts
    with network_fs:
        assert network_fs.recv(1) == b"\xff"
    assert result.network_mounts == ()  # this agent never answered
    channel, _ = agent.accept()
    with channel:
        request = json.loads(channel.recv(4096))
    assert request == {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}
    agent.close()


def test_without_an_agent_the_ladder_stops_after_two_presses():
    clone = FakeMachine(obeys=None)
    result = shut_down(clone, Policy(timeout=0.4, repress_after=0.1))
    assert result.presses == 2 and not result.agent_asked
    assert not result.clean and result.reason.startswith("timed out")


def test_an_unreachable_agent_is_asked_but_not_fatal(tmp_path):
    clone = FakeMachine(obeys=None)
    result = shut_down(clone, Policy(timeout=0.4, repress_after=0.1), tmp_path / "none.sock")
    assert result.agent_asked and not result.clean


def test_qemu_exiting_without_a_shutdown_event_is_unclean():
    clone = FakeMachine(obeys=None)
    clone.alive = False
    result = shut_down(clone, Policy(timeout=2.0, repress_after=0.5))
    assert not result.clean
    assert result.reason == ("QEMU exited without a shutdown event "
                             "(qemu: terminating on signal 15)")


def test_a_lost_qmp_connection_is_unclean():
    clone = FakeMachine(obeys=None)
    clone.qmp.lost = True
    result = shut_down(clone, Policy(timeout=2.0, repress_after=0.5))
    assert not result.clean and result.reason == "QEMU exited without a shutdown event"


def test_a_shutdown_for_another_reason_is_not_clean():
    clone = FakeMachine(obeys=None)
    clone.qmp.pending.append(Event("SHUTDOWN", {"reason": "host-signal"}, time.time()))
    result = shut_down(clone, Policy(timeout=2.0, repress_after=0.5))
    assert not result.clean and result.reason == "host-signal"
    assert result.ended_by == "quit"


def _agent_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    return server


class QuitOnlyQemu:
    """A clone's QEMU process and monitor whose guest ignores the power button (the fake
    clock: a wait for its exit times out at once unless `quit` was sent)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.returncode: int | None = None

    def execute(self, command: str, arguments: dict | None = None, *,
                timeout: float | None = None) -> dict:
        self.commands.append(command)
        if command == "quit":
            self.returncode = 0
        return {}

    def close(self) -> None:
        pass

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("qemu", timeout or 0)
        return self.returncode


def test_a_clone_a_failed_or_interrupted_run_leaves_up_is_quit_without_its_power_button(
        tmp_path):
    """Its disks are thrown away: a power button its guest ignores cost a SIGTERM'd run
    20 s before it exited."""
    qemu = QuitOnlyQemu()
    clone = object.__new__(Clone)
    Machine.__init__(clone, ["qemu"], qmp_path=tmp_path / "clone.sock", name="clone")
    clone.proc, clone._qmp = qemu, qemu  # type: ignore[assignment]
    clone.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert qemu.commands == ["quit"] and clone.ended_by == "quit"
