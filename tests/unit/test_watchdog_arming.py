"""The watchdog's arming protocol, with real processes and pipes (no VM: the resuming
itself is tested against real QEMU in tests/integration/test_watchdog.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmsnap_plugin.fork import watchdog
from kvmsnap_plugin.fork.watchdog import ARM, DISARM, PREFIX, armed_at_eof, guarding
from kvmsnap_plugin.host import outliving, process

ROOT = Path(__file__).resolve().parents[2]
#: a parent whose QEMU is gone: the watchdog must say so and touch nothing
GONE = {"backend": "qmp", "qmp": "/nonexistent/qmp.sock", "parent": "1:gone"}


def words(*sent: bytes) -> bool:
    """What a watchdog concludes from ``sent``, then EOF."""
    read_end, write_end = os.pipe()
    for chunk in sent:
        os.write(write_end, chunk)
    os.close(write_end)
    try:
        return armed_at_eof(read_end)
    finally:
        os.close(read_end)


@pytest.mark.parametrize(("sent", "armed"), [
    ((), False),  # kvmsnap died before arming: the parent was never paused by it
    ((ARM,), True),  # died during the pause
    ((ARM, DISARM), False),  # died after the parent ran again
    ((ARM, DISARM, ARM), True),
    ((ARM + DISARM,), False),  # several words in one read
    ((DISARM,), False),
])
def test_only_eof_while_armed_means_resume(sent, armed):
    assert words(*sent) is armed


def alive(pid: int) -> bool:
    return process.same_process(process.identity(pid)) is not None


def test_a_watchdog_runs_for_the_block_only():
    with guarding(GONE):
        pid = process.SPAWNED_PIDS[-1]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert watchdog.MODULE in cmdline and alive(pid)
    assert not alive(pid)  # reaped: it never outlives a normal run


def die_in(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a child that SIGKILLs itself at its end; the watchdog writes to the
    child's stderr, so this returns once the watchdog has exited too."""
    code = textwrap.dedent(script) + "\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_killed_while_armed_the_watchdog_acts():
    died = die_in(f"""
        from kvmsnap_plugin.fork.watchdog import guarding
        guard = guarding({GONE!r})
        guard.__enter__()  # and never leaves the block
    """)
    assert died.returncode == -9
    assert f"{PREFIX} kvmsnap ended in the middle of the fork" in died.stderr
    assert "QEMU process of the VM at /nonexistent/qmp.sock is gone: nothing to resume" \
        in died.stderr


def test_killed_after_disarming_the_watchdog_does_nothing():
    died = die_in(f"""
        from kvmsnap_plugin.fork.watchdog import Watchdog
        dog = Watchdog({GONE!r})
        dog.arm()
        dog.disarm()
    """)
    assert died.returncode == -9
    assert PREFIX not in died.stderr


def test_killed_before_arming_the_watchdog_does_nothing():
    died = die_in(f"""
        from kvmsnap_plugin.fork.watchdog import Watchdog
        Watchdog({GONE!r})
    """)
    assert died.returncode == -9
    assert PREFIX not in died.stderr


def fake_systemd_run(tmp_path: Path, script: str) -> str:
    path = tmp_path / "systemd-run"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


#: like `systemd-run --scope`: drops its own options and execs the command in place
SCOPE = 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n'


def test_under_a_systemd_service_it_runs_in_a_scope_of_its_own(monkeypatch, tmp_path):
    # systemd SIGKILLs the rest of a service's cgroup when its main process dies
    monkeypatch.setattr(outliving, "under_systemd_service", lambda: True)
    runner = fake_systemd_run(tmp_path, SCOPE)
    monkeypatch.setattr(outliving.shutil, "which", lambda name: runner)
    scoped, plain = outliving.launchers()
    assert scoped[:2] == [runner, "--scope"] and plain == []
    with guarding(GONE):  # the exec keeps the PID and the pipe
        pid = process.SPAWNED_PIDS[-1]
        assert watchdog.MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert not alive(pid)


def test_without_a_scope_it_runs_as_a_plain_child(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(outliving, "under_systemd_service", lambda: True)
    runner = fake_systemd_run(tmp_path, "echo 'Failed to connect to bus' >&2\nexit 1\n")
    monkeypatch.setattr(outliving.shutil, "which", lambda name: runner)
    with guarding(GONE):
        pid = process.SPAWNED_PIDS[-1]
        assert watchdog.MODULE in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert "the watchdog did not start in a scope of its own" in caplog.text
    monkeypatch.setattr(outliving, "under_systemd_service", lambda: False)
    assert outliving.launchers() == [[]]


def unit_settings(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_stopping_the_service_signals_kvmsnap_alone_and_waits_for_it():
    settings = unit_settings(ROOT / "contrib/kvmsnap-backup.service")
    assert settings["KillMode"] == "mixed"  # SIGTERM to kvmsnap, not to its state writer
    assert settings["TimeoutStopSec"].endswith("min")  # minutes to unwind, not 90 s


def test_the_ram_state_writer_runs_in_a_scope_of_its_own_too(monkeypatch, tmp_path):
    """Killed with kvmsnap by systemd, the writer would fail QEMU's background-snapshot write,
    which hangs a QEMU 7.2 parent."""
    from kvmsnap_plugin.fork import ram

    monkeypatch.setattr(outliving, "under_systemd_service", lambda: True)
    record = tmp_path / "ran-with"
    runner = fake_systemd_run(tmp_path, f'echo "$@" > {record}\n' + SCOPE)
    monkeypatch.setattr(outliving.shutil, "which", lambda name: runner)
    writer = ram.StateWriter(tmp_path / "ram.state")
    os.write(writer.write_end, b"guest RAM")
    writer.handed_over()
    writer.finish(timeout=10)
    assert (tmp_path / "ram.state").read_bytes() == b"guest RAM"
    assert record.read_text().startswith("--scope")
