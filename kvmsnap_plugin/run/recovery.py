"""The cleanup step, from the journal: finish or undo whatever a run left behind.

Used by ``kvmsnap recover`` (after a crash or a SIGKILL), at the start of every run on a VM
whose journal is still there, and by ``kvmsnap release`` (the second half of a split
backup, e.g. borgmatic's after-hook). Each action is idempotent and tolerant of what has
already been done, so recovery can itself be interrupted and run again.

The order is the pipeline's in reverse: stop the clone, unmount, detach loop devices, stop
the export daemon, give the parent its chain back (resume it if we paused it, commit its
overlays), delete the RAM state and the work directory. Nothing the guest wrote is lost:
an overlay holding writes is committed, online if the parent runs, offline with
``qemu-img commit`` if its QEMU is gone, and only then deleted. When recovery cannot tell
(QEMU does not answer, the frozen image changed, the domain is only suspended), it keeps
the overlays and the journal, and says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError, VMError
from kvmsnap_plugin.fork.recovery import give_back
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.mounts import detach_loops_of, detach_orphaned_loop, is_mountpoint, unmount
from kvmsnap_plugin.model import JournalState, Recovery
from kvmsnap_plugin.paths import remove_if_empty_socket_dir
from kvmsnap_plugin.run.journal import Journal, held_mount

log = logging.getLogger(__name__)


def recover(journal: Journal) -> Recovery:
    """Undo or finish everything the journal records; forget it if all went well."""
    state = journal.current
    result = Recovery(state.vm or "?")
    steps = (_stop_clone, _unexpose, _restore_parent, _remove_files)
    for step in steps:
        try:
            step(state, journal, result)
        except KvmsnapError as exc:
            result.failed(f"{step.__name__.strip('_').replace('_', ' ')}: {exc}")
    if not result.problems:
        journal.finish()
    return result


# -- the steps --------------------------------------------------------------------------------
def _stop_clone(state: JournalState, journal: Journal, result: Recovery) -> None:
    pid = process.same_process(state.clone)
    if pid:
        process.end_pid(pid)
        result.did(f"stopped the orphaned clone (pid {pid})")
    journal.record(clone=None)


def _unexpose(state: JournalState, journal: Journal, result: Recovery) -> None:
    for path in state.files:
        Path(path).unlink(missing_ok=True)
        remove_if_empty_socket_dir(Path(path).parent)  # the export's, left by a killed run
    for mountpoint in reversed(state.mounts):
        if is_mountpoint(Path(mountpoint)):
            unmount(Path(mountpoint))
            result.did(f"unmounted {mountpoint}")
        journal.discard("mounts", mountpoint)
    for backing in state.loop_files:
        detach_loops_of(Path(backing))
    for loop, backing in zip(state.loops, state.loop_files, strict=False):
        detach_orphaned_loop(Path(loop), Path(backing))
    journal.record(loop_files=[], loops=[])
    pid = process.same_process(state.qsd)
    if pid:
        process.end_pid(pid)
        result.did(f"stopped the disk export daemon (pid {pid})")
    for export in state.exports:
        if is_mountpoint(Path(export)):
            process.run(["umount", "-l", export], timeout=60, check=False)
    journal.record(qsd=None)


def _restore_parent(state: JournalState, journal: Journal, result: Recovery) -> None:
    give_back(state, result)  # raises, keeping the journal's record, when unsure
    journal.record(overlays=[], migration_settings=None, migration_started=False)


def _remove_files(state: JournalState, journal: Journal, result: Recovery) -> None:
    for key in ("workdir", "sockets"):
        directory = getattr(state, key)
        if directory and Path(directory).exists():
            if any(is_mountpoint(Path(m)) for m in state.mounts):
                raise VMError(f"{directory} still has mounts", "unmount them by hand")
            shutil.rmtree(directory, ignore_errors=True)
            result.did(f"removed {directory}")
    root = state.mount_root
    if root and Path(root).is_dir() and not is_mountpoint(Path(root)):
        with contextlib.suppress(OSError):
            for child in sorted(Path(root).rglob("*"), reverse=True):
                child.rmdir()
            Path(root).rmdir()


def recover_all(force: bool = False) -> list[Recovery]:
    """Finish or undo every interrupted run this host has a journal of. A split backup
    still mounted for its reader is left alone (unless ``force``); a journal that cannot
    be read is set aside as ``*.corrupt`` and reported; either way the others go on."""
    results = []
    for path in Journal.all_pending():
        try:
            with Journal.acquire_file(path, quarantine=True) as journal:
                if not journal.pending:
                    continue
                where = None if force else held_mount(journal.current)
                results.append(recover(journal) if where is None else Recovery(
                    journal.current.vm, [f"left alone: mounted at {where}, waiting for "
                                         "`kvmsnap release` (or `kvmsnap recover --force`)"]))
        except KvmsnapError as exc:
            results.append(Recovery(path.stem, problems=[exc.one_line()]))
    return results
