"""The watchdog: resumes a parent that kvmsnap paused, if kvmsnap dies during the pause.

A SIGKILL, an OOM kill or a crash of kvmsnap while the parent is paused would leave the VM
paused until somebody runs ``kvmsnap recover``. So before the fork kvmsnap starts
``python -m kvmsnap_plugin.fork.watchdog``, a small process of its own (its own session,
like the RAM state writer), connected to kvmsnap by a pipe that only kvmsnap can write to.
kvmsnap sends :data:`ARM` before the pause and :data:`DISARM` once the parent runs again,
then closes the pipe. When the pipe reaches EOF - kvmsnap closed it, or died - the watchdog
looks at the last word it read:

- disarmed: kvmsnap is done with the fork (or gone with the parent running): it exits;
- armed: kvmsnap died mid-fork. It reaches the parent (a bare QEMU's QMP socket, free as
  soon as kvmsnap's connection is gone; a libvirt domain through libvirt), lets an
  unfinished RAM snapshot end (cancelling a background snapshot can hang QEMU 7.2), resumes
  the VM if, and only if, it is paused, says so on stderr (the journal, under systemd) and
  exits. ``kvmsnap recover`` then gives the disks back, as after any crash.

It never resumes a VM kvmsnap did not pause: it acts only while armed, i.e. during
kvmsnap's fork of a VM it found running (:func:`guarding` arms for the whole fork; a RAM
snapshot running then is kvmsnap's: QEMU runs one at a time); only on the parent process
kvmsnap recorded (PID and start time; for a bare QEMU, the one serving the socket); and
only from a run state the fork leaves (paused, finish-migrate, postmigrate). Under a
systemd service it runs in a scope of its own, or it would die with kvmsnap (see
:func:`kvmsnap_plugin.host.outliving.launchers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.backends.libvirt import LibvirtBackend
from kvmsnap_plugin.backends.qmp import QmpBackend
from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.fork import ram
from kvmsnap_plugin.host import outliving, process
from kvmsnap_plugin.vm.qmp import socket_owner

log = logging.getLogger(__name__)

#: the watchdog's module, run with ``python -m``
MODULE = "kvmsnap_plugin.fork.watchdog"
#: kvmsnap -> watchdog: "resume the parent if I die now" / "I am done with the pause"
ARM, DISARM = b"A", b"D"
#: the watchdog's interpreter start-up, which must not overlap the pause
START_TIMEOUT = 30.0
#: after DISARM and EOF the watchdog exits at once; longer means it hangs
END_TIMEOUT = 10.0
#: how long the watchdog tries to reach the parent (its QMP socket frees when kvmsnap's
#: connection closes, a few milliseconds after kvmsnap died)
CONNECT_TIMEOUT = 10.0
#: what every message of the watchdog starts with
PREFIX = "kvmsnap watchdog:"


# -- kvmsnap's side ------------------------------------------------------------------------------
@contextlib.contextmanager
def guarding(fields: dict[str, Any]) -> Iterator[None]:
    """Arm a watchdog for the parent described by `fields` (the journal fields of the
    parent handle: backend, qmp socket / libvirt uri+domain+uuid, parent identity) for the
    duration of the block, which must contain the whole pause (the fork)."""
    watchdog = Watchdog(fields)
    try:
        watchdog.arm()
        yield
    finally:
        watchdog.stop()


class Watchdog:
    """kvmsnap's end of the pipe to a running watchdog process."""

    def __init__(self, fields: dict[str, Any]) -> None:
        read_end, self._control = os.pipe()  # not inheritable: no other child holds it
        try:
            # stderr is kvmsnap's: what the watchdog did after kvmsnap died lands in the same
            # terminal or journal.
            proc = outliving.spawn_ready([sys.executable, "-m", MODULE, json.dumps(fields)],
                                         "the watchdog", timeout=START_TIMEOUT,
                                         stdin=read_end, stderr=None)
        finally:
            os.close(read_end)
        if proc is None:
            os.close(self._control)
            raise HostError("the watchdog that resumes the VM if kvmsnap dies did not start",
                            "see its message above; run `kvmsnap doctor`; rerun with --debug")
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    def arm(self) -> None:
        """From now on, kvmsnap dying means the parent gets resumed."""
        try:
            os.write(self._control, ARM)
        except OSError:
            raise HostError(f"the watchdog that resumes the VM if kvmsnap dies exited "
                            f"(code {self._proc.poll()}) before the pause",
                            "see its message above; rerun with --debug") from None

    def disarm(self) -> None:
        """The parent runs again: kvmsnap dying from now on must not touch it."""
        with contextlib.suppress(OSError):  # it may have died: nothing to disarm
            os.write(self._control, DISARM)

    def stop(self) -> None:
        """Disarm and let it go; it has exited on return (never outlives the fork)."""
        if self._control >= 0:
            self.disarm()
            os.close(self._control)
            self._control = -1
        try:
            self._proc.wait(END_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.stop(self._proc, grace=1)




# -- the watchdog's side -------------------------------------------------------------------------
def armed_at_eof(control: int) -> bool:
    """Read kvmsnap's words until EOF; was the last one :data:`ARM`?"""
    armed = False
    while chunk := os.read(control, 64):
        for word in chunk:
            if word == ARM[0]:
                armed = True
            elif word == DISARM[0]:
                armed = False
    return armed


def resume_parent(fields: dict[str, Any]) -> str:
    """Resume the parent if it is paused; what was done, in words."""
    name = vm_name(fields)
    recorded = fields.get("parent")
    pid = process.same_process(recorded) if recorded else None
    if recorded and pid is None:
        return f"the QEMU process of {name} is gone: nothing to resume"
    backend = _backend(fields, pid)
    with backend:
        if not backend.online():
            return f"{name} is not running: nothing to resume"
        # A RAM snapshot may still run (the writer outlives kvmsnap): let it end first.
        status = ram.settle_migration(backend.monitor)
        was = ram.resume_if_paused(backend)
    ended = f" after its RAM snapshot ended ({status})" if status else ""
    if was:
        return f"resumed {name}, which kvmsnap had left {was}{ended}"
    return f"{name} was running{ended}: left as it is"


def vm_name(fields: dict[str, Any]) -> str:
    """The VM as messages name it: by name if the caller added one ("vm")."""
    if fields.get("vm"):
        return str(fields["vm"])
    if fields.get("domain"):
        return f"domain {fields['domain']}"
    return f"the VM at {fields.get('qmp')}"


def _backend(fields: dict[str, Any], pid: int | None) -> Backend:
    if fields.get("backend") == LibvirtBackend.kind:
        return LibvirtBackend(str(fields.get("domain") or ""), fields.get("libvirt_uri"),
                              fields.get("uuid") or None, must_exist=False)
    path = Path(str(fields.get("qmp") or ""))
    if pid is not None and _served_by(path) not in (pid, None):
        raise HostError(f"{path} is no longer served by the QEMU kvmsnap paused (PID {pid})",
                        "resume the VM by hand if it is paused, then run `kvmsnap recover`")
    return QmpBackend(path, pid, connect_timeout=CONNECT_TIMEOUT)


def _served_by(path: Path) -> int | None:
    """The PID listening on the socket; None if it cannot be told."""
    try:
        return socket_owner(path)
    except KvmsnapError:
        return None


def _preload(fields: dict[str, Any]) -> None:
    """Import now what resuming needs: it must take milliseconds once kvmsnap died."""
    if fields.get("backend") == LibvirtBackend.kind:
        with contextlib.suppress(ImportError):  # resuming says why it cannot
            import libvirt  # noqa: F401
            import libvirt_qemu  # noqa: F401


def say(message: str) -> None:
    """To kvmsnap's stderr; never raises: its reader may have died with kvmsnap, and the
    resuming must not die of that."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    encoded, ready = (argv or sys.argv[1:])[:2]
    fields = json.loads(encoded)
    _preload(fields)
    os.write(int(ready), b"1")  # kvmsnap pauses the VM only after this byte
    os.close(int(ready))
    if not armed_at_eof(sys.stdin.fileno()):
        return 0  # kvmsnap disarmed it (or died with the parent running): nothing to do
    name = vm_name(fields)
    say(f"kvmsnap ended in the middle of the fork of {name}; resuming it if it is paused")
    try:
        done = resume_parent(fields)
    except KvmsnapError as exc:
        say(f"could not resume {name}: {exc.one_line()}")
        return 1
    except Exception as exc:  # the last word must say what happened, whatever it was
        say(f"could not resume {name}: {type(exc).__name__}: {exc} (fix: resume it by hand, "
            "e.g. QMP `cont` or `virsh resume`, then run `kvmsnap recover`)")
        return 1
    say(f"{done}; run `kvmsnap recover` to give it its disks back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
