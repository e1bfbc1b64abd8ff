"""The cleanup step, from the journal: finish or undo whatever a run left behind.

Used by ``kvmsnap recover`` (after a crash or a SIGKILL), at the start of every run on a VM
whose journal is still there, and by ``kvmsnap release`` (the second half of a split
backup, e.g. borgmatic's after-hook). Each action is idempotent and tolerant of what has
already been done, so recovery can itself be interrupted and run again.

The order is the pipeline's in reverse: stop the clone, unmount, detach loop devices, stop
the export daemon, give the parent its chain back (resume it if we paused it, commit its
overlays), delete the RAM state and the work directory. Nothing the guest wrote is lost:
an overlay holding writes is committed, online if the parent runs, offline with
``qemu-img commit`` if its QEMU is gone, and only then deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmsnap_plugin import process
from kvmsnap_plugin.errors import KvmsnapError, VMError
from kvmsnap_plugin.expose import detach_loops_of, detach_orphaned_loop, is_mountpoint, unmount
from kvmsnap_plugin.fork import ForkedDisk
from kvmsnap_plugin.journal import Journal
from kvmsnap_plugin.parent import ParentDisk
from kvmsnap_plugin.parents import restore_parent

log = logging.getLogger("kvmsnap")


@dataclass
class Recovery:
    """What a recovery did, for the report."""

    vm: str
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def did(self, action: str) -> None:
        log.info("%s: %s", self.vm, action)
        self.actions.append(action)

    def failed(self, problem: str) -> None:
        log.error("%s: %s", self.vm, problem)
        self.problems.append(problem)


def forked_disks(journal: Journal) -> list[ForkedDisk]:
    disks = []
    for entry in journal.data.get("overlays", []):
        info = dict(entry["disk"])
        info["chain"] = tuple(info.get("chain", ()))
        disks.append(ForkedDisk(ParentDisk(**info), Path(entry["parent_overlay"]),
                                entry["overlay_node"]))
    return disks


def recover(journal: Journal) -> Recovery:
    """Undo or finish everything the journal records; forget it if all went well."""
    data = journal.data
    result = Recovery(data.get("vm", "?"))
    steps = (_stop_clone, _unexpose, _restore_parent, _remove_files)
    for step in steps:
        try:
            step(data, journal, result)
        except KvmsnapError as exc:
            result.failed(f"{step.__name__.strip('_').replace('_', ' ')}: {exc}")
    if not result.problems:
        journal.finish()
    return result


# -- the steps --------------------------------------------------------------------------------
def _stop_clone(data: dict[str, Any], journal: Journal, result: Recovery) -> None:
    pid = process.same_process(data.get("clone"))
    if pid:
        _kill(pid)
        result.did(f"stopped the orphaned clone (pid {pid})")
    journal.record(clone=None)


def _unexpose(data: dict[str, Any], journal: Journal, result: Recovery) -> None:
    for path in data.get("files", []):
        Path(path).unlink(missing_ok=True)
    for mountpoint in reversed(data.get("mounts", [])):
        if is_mountpoint(Path(mountpoint)):
            unmount(Path(mountpoint))
            result.did(f"unmounted {mountpoint}")
        journal.discard("mounts", mountpoint)
    for backing in data.get("loop_files", []):
        detach_loops_of(Path(backing))
    for loop, backing in zip(data.get("loops", []), data.get("loop_files", []), strict=False):
        detach_orphaned_loop(Path(loop), Path(backing))
    journal.record(loop_files=[], loops=[])
    pid = process.same_process(data.get("qsd"))
    if pid:
        _kill(pid)
        result.did(f"stopped the disk export daemon (pid {pid})")
    for export in data.get("exports", []):
        if is_mountpoint(Path(export)):
            process.run(["umount", "-l", export], timeout=60, check=False)
    journal.record(qsd=None)


def _restore_parent(data: dict[str, Any], journal: Journal, result: Recovery) -> None:
    restore_parent(data, forked_disks(journal), result)
    journal.record(overlays=[])


def _remove_files(data: dict[str, Any], journal: Journal, result: Recovery) -> None:
    for key in ("workdir", "sockets"):
        directory = data.get(key)
        if directory and Path(directory).exists():
            if any(is_mountpoint(Path(m)) for m in data.get("mounts", [])):
                raise VMError(f"{directory} still has mounts", "unmount them by hand")
            shutil.rmtree(directory, ignore_errors=True)
            result.did(f"removed {directory}")
    root = data.get("mount_root")
    if root and Path(root).is_dir() and not is_mountpoint(Path(root)):
        with contextlib.suppress(OSError):
            for child in sorted(Path(root).rglob("*"), reverse=True):
                child.rmdir()
            Path(root).rmdir()


# -- processes we started -------------------------------------------------------------------------
def _kill(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
