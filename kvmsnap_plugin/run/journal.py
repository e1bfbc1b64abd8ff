"""A crash-safe record of one backup of one VM, and the per-VM lock.

Every step records what it is about to create *before* creating it (overlay files, the RAM
state file, the clone's PID, loop devices, mounts), so that after a crash, a SIGKILL or a
host reboot, ``kvmsnap recover`` (and the start of the next run on that VM) can finish or
undo it: resume the parent, commit its overlays back, stop the clone, unmount, detach, and
delete what holds the guest's data. The journal is a JSON file in STATE_DIR (0700),
rewritten atomically on each change; a lock file next to it is held (flock) by the process
working on the VM, so a second run on the same VM is refused while the first is alive.

Both are named after the VM itself, not after the path it was reached by: two sockets of
one QEMU (a symlink, a bind mount, its second ``-qmp``) are one lock. A bare QEMU is its
``-uuid`` if it has one, else its process (PID, start time, boot); a libvirt domain is its
UUID. A journal that cannot be read blocks no other VM: ``recover`` sets it aside.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends.libvirt import connect, find_domain
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import dirs, process
from kvmsnap_plugin.host.mounts import is_mountpoint
from kvmsnap_plugin.model import BackupJob, JournalState, Phase
from kvmsnap_plugin.paths import STATE_DIR, safe_name
from kvmsnap_plugin.vm.parent import qemu_uuid
from kvmsnap_plugin.vm.qmp import socket_owner

log = logging.getLogger(__name__)

#: what to do about a journal whose record is lost: what it may have listed, by hand
UNDO_BY_HAND = ("undo what it lists by hand (commit the VM's *.kvmsnap-*.qcow2 overlays "
                "beside its images; unmount what is under the work directory), then delete it")
JOURNAL_HINT = f"run `kvmsnap recover`, which sets the file aside as *.corrupt; {UNDO_BY_HAND}"


class CorruptJournal(VMError, hint=JOURNAL_HINT):
    """A journal file that cannot be read: what it recorded is unknown."""


def vm_key(identity: str) -> str:
    """A stable file name for a VM identity (see :func:`vm_identity`)."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    # Identities of older versions were socket paths: their journals keep their names.
    label = Path(identity).stem if identity.startswith("/") else identity.split(":", 1)[0]
    return f"{safe_name(label)[:40]}-{digest}"


def vm_identity(job: BackupJob) -> str:
    """What the lock is keyed on: the VM, whatever path or name it was reached by."""
    if job.domain:
        conn = connect(job.libvirt_uri)
        try:
            dom = find_domain(conn, job.domain)
            if dom is None:
                raise VMError(f"there is no libvirt domain named {job.domain!r} at "
                              f"{job.libvirt_uri}",
                              f"check the name with `virsh -c {job.libvirt_uri} list --all`")
            return f"libvirt:{dom.UUIDString()}"
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    pid = job.fork.pid or socket_owner(Path(job.qmp or ""))
    uuid = qemu_uuid(pid)
    return f"qemu-uuid:{uuid}" if uuid else f"qemu:{process.identity(pid)}"


def state_dir() -> Path:
    directory = Path(os.environ.get("KVMSNAP_STATE_DIR", str(STATE_DIR)))
    return dirs.private_dir(directory, "the state directory")


class Journal:
    """The journal of one VM; open it with :meth:`acquire` or :meth:`acquire_file`."""

    def __init__(self, path: Path, lock_path: Path, lock_fd: int | None,
                 identity: str = "") -> None:
        self.path = path
        self.identity = identity
        self._lock_path = lock_path
        self._lock_fd = lock_fd
        self.state: JournalState | None = read_state(path) if path.exists() else None

    @classmethod
    def acquire(cls, identity: str) -> Journal:
        """Lock the VM for this process; raise if another live run holds it."""
        return cls.acquire_file(state_dir() / f"{vm_key(identity)}.json", identity=identity)

    @classmethod
    def acquire_file(cls, path: Path, *, identity: str = "",
                     quarantine: bool = False) -> Journal:
        """Lock the VM of the journal file ``path``. A file that cannot be read raises
        :class:`CorruptJournal`; with ``quarantine`` it is first renamed to ``*.corrupt``
        (kept, and out of the way of every later run)."""
        lock = path.with_suffix(".lock")
        fd = _lock(lock)
        try:
            return cls(path, lock, fd, identity)
        except CorruptJournal as exc:
            if quarantine:
                kept = _set_aside(path)
                exc = CorruptJournal(f"{exc}; it is kept as {kept}", UNDO_BY_HAND)
            if not path.exists():
                lock.unlink(missing_ok=True)
            os.close(fd)
            raise exc from None
        except BaseException:
            os.close(fd)
            raise

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
        self.state = JournalState(pid=os.getpid(), boot=process.boot_id()).updated(**fields)
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
        _sync_directory(self.path.parent)


def _lock(lock: Path) -> int:
    """An fd holding ``lock`` (flock); raise if a live process holds it."""
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
    return fd


def _set_aside(path: Path) -> Path:
    """Rename an unreadable journal out of the way (never over an earlier one); synced."""
    kept = path.with_name(path.name + ".corrupt")
    if kept.exists():
        kept = path.with_name(f"{path.name}.{int(time.time())}.corrupt")
    path.rename(kept)
    _sync_directory(path.parent)
    return kept


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path: Path) -> JournalState:
    """A journal file's state; a file that cannot be read raises :class:`CorruptJournal`."""
    try:
        return JournalState.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptJournal(f"the journal {path} cannot be read: {exc}") from None


def refuse_if_mounted(job: BackupJob, journal: Journal) -> None:
    """Never start a run under a reader's feet: a split backup of this VM still mounted
    (``kvmsnap mount``, e.g. for borgmatic) is released first, by whoever mounted it."""
    others = [path for path in journals_naming(job) if path != journal.path]
    if others:  # e.g. of a QEMU since restarted behind the same socket: recover decides
        log.warning("%s: earlier runs left journals (%s): see `kvmsnap recover`", job.name,
                    ", ".join(path.name for path in others))
    states = [journal.current] if journal.pending else []
    states += [state for state in map(_readable, others) if state]
    where = next((where for where in map(held_mount, states) if where), None)
    if where:
        raise VMError(f"{job.name} is still mounted at {where} by `kvmsnap mount` (another "
                      "tool may be reading it)", "run `kvmsnap release` first")


def pending_journal(job: BackupJob) -> Journal | None:
    """The unfinished journal of ``job``'s VM, locked: under the VM's key, or, when the
    VM cannot be reached (it is gone) or was keyed otherwise (an older kvmsnap), the one
    naming its socket or domain. None if there is none."""
    try:
        identity: str | None = vm_identity(job)
    except VMError:
        identity = None
    if identity:
        journal = Journal.acquire(identity)
        if journal.pending:
            return journal
        journal.release()
    found = journals_naming(job)
    return Journal.acquire_file(found[0]) if found else None


def journals_naming(job: BackupJob) -> list[Path]:
    """Unfinished journals that name ``job``'s socket or domain, whatever their key."""
    return [path for path in Journal.all_pending()
            if (state := _readable(path)) and names_same_vm(state, job)]


def _readable(path: Path) -> JournalState | None:
    try:
        return read_state(path)
    except CorruptJournal:
        return None


def names_same_vm(state: JournalState, job: BackupJob) -> bool:
    """Does a journal name the socket or the domain of ``job`` (whatever its key)?"""
    if job.domain:
        return state.domain == job.domain and state.libvirt_uri == job.libvirt_uri
    return bool(state.qmp and job.qmp) and \
        os.path.realpath(state.qmp or "") == os.path.realpath(job.qmp or "")


def held_mount(state: JournalState) -> str | None:
    """Where a split backup (``kvmsnap mount``) is still mounted for the tool reading it;
    None if the journal holds no such mount: another phase, a previous boot, or its
    mounts are gone (then it is stale, and recovery may take it down)."""
    if state.phase is not Phase.MOUNTED:
        return None
    if state.boot and state.boot != process.boot_id():
        return None
    if not any(is_mountpoint(Path(m)) for m in (*state.mounts, *state.exports)):
        return None
    return state.mount_root or (state.mounts[0] if state.mounts else "?")
