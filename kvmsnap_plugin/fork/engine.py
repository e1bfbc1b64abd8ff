"""The fork point: one instant of the parent's disks and RAM, with the parent paused briefly.

Written once for both backends (:mod:`kvmsnap_plugin.backends`). Everything that can be
prepared runs before the pause: overlay files are created (and, for a bare QEMU,
attached), migration capabilities set, the RAM state file opened and its descriptor handed
to QEMU. The pause itself holds only the pause, the disk snapshot (the parent continues on
the new overlays, the old images are frozen) and the start of the RAM snapshot.

With ``background-snapshot`` QEMU's migration thread captures the CPU and device state and
write-protects RAM, then resumes the VM itself (QEMU 7.2) and streams RAM copy-on-write
while the guest runs. Newer QEMU restores the previous runstate instead, leaving a VM we
paused paused. We never assume either: we watch for RESUME and for the migration's end,
and resume the VM only if QEMU did not after the capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.backends.libvirt import LibvirtBackend
from kvmsnap_plugin.backends.qmp import QmpBackend
from kvmsnap_plugin.errors import KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.fork import ram
from kvmsnap_plugin.fork.chain import commit_back, delete_overlay
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import (
    FORK_TIMEOUT,
    MIGRATION_FAILED,
    BackupJob,
    Commit,
    ForkedDisk,
    ForkPoint,
    Parent,
    ParentDisk,
    RamMethod,
)
from kvmsnap_plugin.vm.clone_argv import copy_master_key
from kvmsnap_plugin.vm.qmp import Event

log = logging.getLogger(__name__)


# -- the facade the pipeline uses ----------------------------------------------------------------
class ParentHandle:
    """The parent VM for one run, whatever its backend (``with open_parent(job) as parent``)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __enter__(self) -> ParentHandle:
        self.backend.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.__exit__(*exc)

    def describe(self) -> Parent:
        """The VM, checked for clonability (raises VMError otherwise)."""
        return self.backend.describe()

    def fork(self, parent: Parent, planned: tuple[ForkedDisk, ...], state_file: Path,
             method: RamMethod | str) -> ForkPoint:
        """Pause, snapshot disks and RAM at one instant, resume; undo on failure."""
        return take_fork(self.backend, parent, planned, state_file, method=method)

    def commit_back(self, disks: Sequence[ForkedDisk]) -> list[Commit]:
        """Give the parent its chain back: live-commit each overlay, delete it."""
        return commit_back(self.backend, disks)

    def journal_fields(self) -> dict[str, Any]:
        """What recovery needs to find this VM again after a crash (for journal.start)."""
        return self.backend.journal_fields()


def open_parent(job: BackupJob) -> ParentHandle:
    """The parent VM of ``job``: its libvirt domain if it names one, else its QMP socket."""
    if job.domain:
        return ParentHandle(LibvirtBackend(job.domain, job.libvirt_uri))
    return ParentHandle(QmpBackend(job.qmp, job.fork.pid))


def parent_overlay_path(disk: ParentDisk, run_id: str, overlay_dir: Path | None) -> Path:
    """Where the parent writes during the backup: next to its image unless told otherwise.

    Next to the image means the same filesystem and the same persistence as the image, so
    a host crash mid-backup leaves a chain that ``kvmsnap recover`` can commit.
    """
    frozen = Path(disk.filename)
    directory = overlay_dir or frozen.parent
    return directory / f"{frozen.name}.kvmsnap-{run_id}.qcow2"


def plan_fork(parent: Parent, run_id: str, overlay_dir: Path | None) -> tuple[ForkedDisk, ...]:
    """The parent's overlays-to-be: recorded in the journal before they exist."""
    return tuple(ForkedDisk(disk, parent_overlay_path(disk, run_id, overlay_dir),
                            f"kvmsnap-{run_id}-{index}")
                 for index, disk in enumerate(parent.writable_disks))


# -- the fork -------------------------------------------------------------------------------------
def take_fork(backend: Backend, parent: Parent, planned: tuple[ForkedDisk, ...],
              state_file: Path, *, method: RamMethod | str = RamMethod.AUTO,
              timeout: float = FORK_TIMEOUT) -> ForkPoint:
    """Fork the parent's disks and RAM at one instant. The parent runs again on return.

    On failure the parent is resumed and its chain restored before the error propagates.
    """
    if parent.offline:
        raise VMError(f"{parent.name} is shut off: there is nothing to fork",
                      "back its images up directly (the pipeline does, for offline VMs)")
    # libvirt deletes the domain's master key when it stops; the clone starts later.
    copy_master_key(parent.argv, state_file.parent, Path(f"/proc/{parent.pid}/root"))
    _attach_overlays(backend, planned)
    monitor = backend.monitor
    saved: dict[str, bool] | None = None
    applied = False
    writer: ram.StateSink | None = None
    try:
        saved = ram.migration_capabilities(monitor)
        method = ram.configure_migration(monitor, method)
        writer = ram.open_state_fd(monitor, state_file, method)
        log.info("pausing %s for the fork (%s)", parent.name, method)
        point = _pause_and_snapshot(backend, parent, planned, state_file, method, timeout)
        applied = True
        writer.finish()
        return point
    except BaseException:
        applied = applied or _snapshot_applied(backend, planned)
        _undo(backend, planned, applied)
        state_file.unlink(missing_ok=True)
        raise
    finally:
        if writer:
            writer.close()
        if saved is not None:
            ram.restore_capabilities(monitor, saved)


def _attach_overlays(backend: Backend, planned: Sequence[ForkedDisk]) -> None:
    """Before the pause: libvirt creating the overlays itself doubles it (~80 vs ~40 ms)."""
    try:
        for forked in planned:
            disk = forked.disk
            create_overlay(forked.parent_overlay, disk.filename, disk.format, disk.virtual_size)
        backend.attach_overlays(planned)
    except BaseException:
        _detach_overlays(backend, planned)
        raise


def _detach_overlays(backend: Backend, planned: Sequence[ForkedDisk]) -> None:
    """The overlays were never any disk's layer: they hold nothing."""
    backend.detach_overlays(planned)
    for forked in planned:
        delete_overlay(forked)


def _pause_and_snapshot(backend: Backend, parent: Parent, planned: Sequence[ForkedDisk],
                        state_file: Path, method: str, timeout: float) -> ForkPoint:
    monitor = backend.monitor
    monitor.events()  # forget older events: STOP/RESUME below must be ours
    backend.pause()
    stop = monitor.wait_event("STOP", 10)
    faults.point("paused")
    started = time.monotonic()
    backend.snapshot_disks(planned, f"kvmsnap-{state_file.parent.name}")
    disk_ms = (time.monotonic() - started) * 1000
    faults.point("disk-snapshot")
    monitor.execute("migrate", {"uri": f"fd:{ram.STATE_FD_NAME}"})
    faults.point("ram-save")
    resume = _wait_for_resume(backend, method, timeout)
    pause_ms = (resume.timestamp - stop.timestamp) * 1000
    log.info("%s ran again after %.1f ms; saving its RAM", parent.name, pause_ms)
    info = ram.wait_migration(monitor, timeout)
    memory = info.get("ram", {})
    return ForkPoint(parent, tuple(planned), state_file, RamMethod(method), pause_ms, disk_ms,
                     info.get("total-time", 0) / 1000, int(memory.get("total", 0)),
                     info.get("downtime"))


def _wait_for_resume(backend: Backend, method: str, timeout: float) -> Event:
    """The RESUME that ends the pause, resuming the VM only where QEMU will not."""
    monitor = backend.monitor
    if method == RamMethod.STOP_AND_COPY:
        ram.wait_migration(monitor, timeout)
        ram.wait_migration_finalized(monitor)
        backend.resume()
        return monitor.wait_event("RESUME", 10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return monitor.wait_event("RESUME", 0.02)
        except StepTimeout:
            pass
        status = monitor.execute("query-migrate").get("status")
        if status == "completed":
            # QEMU kept the VM paused after the capture (QEMU 8.2+ behaviour).
            backend.resume()
            return monitor.wait_event("RESUME", 10)
        if status in MIGRATION_FAILED:
            raise VMError(f"the RAM snapshot {status}", "see the VM's QEMU log")
    raise StepTimeout(f"the RAM snapshot did not capture the VM within {timeout:g} s")


# -- undo -----------------------------------------------------------------------------------------
def _snapshot_applied(backend: Backend, planned: Sequence[ForkedDisk]) -> bool:
    """Is any overlay already the active layer of a parent disk?"""
    try:
        return bool(backend.active_overlays(planned))
    except KvmsnapError:
        return False


def _undo(backend: Backend, planned: Sequence[ForkedDisk], applied: bool) -> None:
    """After a failed fork: the parent runs, on its original chain, holding every write."""
    try:
        ram.settle_migration(backend.monitor)
        ram.resume_if_paused(backend)
    except KvmsnapError as exc:
        log.error("could not resume the parent after a failed fork: %s", exc)
    try:
        if applied:
            commit_back(backend, planned)
        else:
            _detach_overlays(backend, planned)
    except KvmsnapError as exc:
        log.error("could not restore the parent's disk chain: %s (run `kvmsnap recover`)", exc)
