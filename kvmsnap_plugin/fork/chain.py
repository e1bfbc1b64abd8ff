"""The parent's disk chain: give it back, and keep standalone copies of the clone's disks.

Order matters: the frozen images are the backing files of the clone's overlays. Once the
parent's overlay is committed into a frozen image, the clone's view of that disk changes,
so everything that reads the clone's disks must be done before :func:`commit_back`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvmsnap_plugin.errors import KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.model import Commit
from kvmsnap_plugin.vm.qmp import QmpSession

if TYPE_CHECKING:
    from kvmsnap_plugin.model import ForkedDisk

log = logging.getLogger("kvmsnap")




def commit_back(session: QmpSession, disks: Sequence[ForkedDisk],
                timeout: float = 3600.0) -> list[Commit]:
    """Live-commit each parent overlay into its frozen image, then delete the overlay.

    An active commit: QEMU copies the overlay down while the guest keeps writing, mirrors
    new writes, and on ``block-job-complete`` pivots the disk back onto the frozen image,
    which then holds every write. Every disk is attempted even if one fails.
    """
    jobs = {disk.overlay_node: f"kvmsnap-commit-{i}" for i, disk in enumerate(disks)}
    return commit_each(disks, lambda disk: _commit_one(session, disk, jobs[disk.overlay_node],
                                                       timeout))


def commit_each(disks: Sequence[ForkedDisk],
                commit_one: Callable[[ForkedDisk], Commit]) -> list[Commit]:
    """Commit every disk, even after one fails; then raise for all that failed."""
    done, failures = [], []
    for disk in disks:
        try:
            done.append(commit_one(disk))
        except KvmsnapError as exc:
            failures.append(f"{disk.disk.device}: {exc}")
    if failures:
        raise VMError("committing the VM's overlays back failed: " + "; ".join(failures),
                      "the VM still runs on its overlay; run `kvmsnap recover` to retry")
    return done


def _commit_one(session: QmpSession, disk: ForkedDisk, job: str, timeout: float) -> Commit:
    started = time.monotonic()
    written = 0
    running = {j["device"] for j in session.execute("query-block-jobs")}
    if disk.overlay_node not in _top_nodes(session) and job not in running:
        log.debug("%s is not active; nothing to commit", disk.overlay_node)
    else:
        log.info("committing the parent's writes on %s back into %s", disk.disk.device,
                 disk.frozen.name)
        if job in running:  # left by an interrupted run: finish it rather than start anew
            if any(j["device"] == job and j.get("ready") for j in
                   session.execute("query-block-jobs")):
                session.execute("block-job-complete", {"device": job})
        else:
            session.execute("block-commit", {"job-id": job, "device": disk.overlay_node,
                                             "base-node": disk.disk.node})
            faults.point("commit")
        ready = _wait_job(session, job, ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"), timeout)
        if ready.name == "BLOCK_JOB_READY":
            session.execute("block-job-complete", {"device": job})
            ready = _wait_job(session, job, ("BLOCK_JOB_COMPLETED",), timeout)
        if ready.data.get("error"):
            raise VMError(f"block-commit of {disk.disk.device} failed: {ready.data['error']}")
        written = int(ready.data.get("len", 0))
    try:
        session.execute("blockdev-del", {"node-name": disk.overlay_node})
    except KvmsnapError as exc:
        log.debug("blockdev-del %s: %s", disk.overlay_node, exc)
    disk.parent_overlay.unlink(missing_ok=True)
    return Commit(disk.disk.device, time.monotonic() - started, written)


def _wait_job(session: QmpSession, job: str, names: tuple[str, ...], timeout: float):
    try:
        event = session.wait_event(names, timeout, lambda e: e.data.get("device") == job)
    except StepTimeout:
        session.execute("block-job-cancel", {"device": job, "force": True})
        raise
    return event


def _top_nodes(session: QmpSession) -> set[str]:
    return {b["inserted"]["node-name"] for b in session.execute("query-block")
            if b.get("inserted")}


