"""A crash-safe record of one backup of one VM, and the per-VM lock.

Every step records what it is about to create *before* creating it (overlay files, the RAM
state file, the clone's PID, loop devices, mounts), so that after a crash, a SIGKILL or a
host reboot, ``kvmsnap recover`` (and the start of the next run on that VM) can finish or
undo it: resume the parent, commit its overlays back, stop the clone, unmount, detach, and
delete what holds the guest's data. The journal is a JSON file in STATE_DIR (0700),
rewritten atomically on each change; a lock file next to it is held (flock) by the process
working on the VM, so a second run on the same VM is refused while the first is alive.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import HostError, VMError
from kvmsnap_plugin.model import JournalState
from kvmsnap_plugin.paths import STATE_DIR, safe_name


def vm_key(identity: str) -> str:
    """A stable file name for a VM identity (a socket's real path, a libvirt domain)."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{safe_name(Path(identity).stem)[:40]}-{digest}"


def state_dir() -> Path:
    directory = Path(os.environ.get("KVMSNAP_STATE_DIR", str(STATE_DIR)))
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"cannot create the state directory {directory}: {exc.strerror}",
                        "run as root, or set KVMSNAP_STATE_DIR to a writable directory") from None
    return directory


class Journal:
    """The journal of one VM; open it with :meth:`acquire`."""

    def __init__(self, path: Path, lock_path: Path, lock_fd: int | None) -> None:
        self.path = path
        self._lock_path = lock_path
        self._lock_fd = lock_fd
        self.state: JournalState | None = read_state(path) if path.exists() else None

    @classmethod
    def acquire(cls, identity: str) -> Journal:
        """Lock the VM for this process; raise if another live run holds it."""
        directory = state_dir()
        key = vm_key(identity)
        lock = directory / f"{key}.lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise VMError(f"another kvmsnap run (pid {holder}) is working on this VM",
                              "wait for it to finish; if it hangs, stop it and run "
                              "`kvmsnap recover`") from None
            # The holder before us may have removed the file after we opened it.
            if lock.exists() and os.fstat(fd).st_ino == lock.stat().st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(directory / f"{key}.json", lock, fd)

    @classmethod
    def all_pending(cls) -> list[Path]:
        """Journals left by runs that did not finish (their VMs need recovery)."""
        return sorted(state_dir().glob("*.json"))

    @property
    def pending(self) -> bool:
        return self.state is not None

    @property
    def current(self) -> JournalState:
        """The state of a started run (an empty one before :meth:`start`)."""
        return self.state or JournalState()

    def start(self, **fields: Any) -> None:
        self.state = JournalState(pid=os.getpid()).updated(**fields)
        self._write()

    def record(self, **fields: Any) -> None:
        self.state = self.current.updated(**fields)
        self._write()

    def append(self, key: str, value: Any) -> None:
        self.record(**{key: (*getattr(self.current, key), value)})

    def discard(self, key: str, value: Any) -> None:
        self.record(**{key: tuple(v for v in getattr(self.current, key) if v != value)})

    def finish(self) -> None:
        """The run is over and nothing is left to undo: forget it."""
        self.state = None
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Drop the lock (the journal stays if the run is not finished)."""
        if self._lock_fd is not None:
            if not self.pending:
                self._lock_path.unlink(missing_ok=True)  # nothing left: leave no file
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write(self) -> None:
        """Atomically: the new file is synced, renamed over the old, and the rename synced."""
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.current.to_dict(), handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.rename(self.path)
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def read_state(path: Path) -> JournalState:
    """A journal file's state; a file that cannot be read raises :class:`VMError`."""
    try:
        return JournalState.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise VMError(f"the journal {path} cannot be read: {exc}",
                      "inspect it, undo what it lists by hand, then delete it") from None
