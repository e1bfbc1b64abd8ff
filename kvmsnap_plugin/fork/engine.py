"""The fork point: one instant of the parent's disks and RAM, with the parent paused briefly.

Written once for both backends (:mod:`kvmsnap_plugin.backends`). Everything that can be
prepared runs before the pause: overlay files are created (and, for a bare QEMU,
attached), migration capabilities set, the RAM state file opened and its descriptor handed
to QEMU. The pause itself holds only the pause, the disk snapshot (the parent continues on
the new overlays, the old images are frozen) and the start of the RAM snapshot.

With ``background-snapshot`` QEMU's migration thread captures the CPU and device state and
write-protects RAM, then resumes the VM itself (QEMU 7.2) and streams RAM copy-on-write
while the guest runs. QEMU 9.0 on restores the previous runstate instead, leaving a VM we
paused paused. We never assume either: we watch for RESUME and for the first RAM page
sent, which proves the capture done (:func:`~kvmsnap_plugin.fork.ram.capture_done`), and
resume the VM then only if QEMU did not.

A stop-and-copy snapshot pauses the guest for its whole RAM save: it is refused before the
pause when it cannot keep within ``max_pause``. When a fork fails, whether the disk
snapshot took is asked of QEMU's block graph; "no answer" is never taken for "no": the
overlays are then kept, the VM left running, and ``kvmsnap recover`` asks again.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.backends.libvirt import LibvirtBackend
from kvmsnap_plugin.backends.qmp import QmpBackend
from kvmsnap_plugin.errors import HostError, KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.fork import ram
from kvmsnap_plugin.fork.chain import (
    Layer,
    commit_back,
    delete_overlay,
    io_error,
    locate,
    stamp_of,
)
from kvmsnap_plugin.host import dirs, faults
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import (
    FORK_TIMEOUT,
    MAX_PAUSE,
    MIGRATION_FAILED,
    BackupJob,
    Commit,
    ForkedDisk,
    ForkPoint,
    Parent,
    ParentDisk,
    RamMethod,
)
from kvmsnap_plugin.paths import DEFAULT_WORKDIR, safe_name
from kvmsnap_plugin.vm.clone_options import clonable
from kvmsnap_plugin.vm.clone_secrets import write_clone_secrets
from kvmsnap_plugin.vm.qmp import Event

log = logging.getLogger(__name__)

#: writes fields into the run's journal (``Journal.record``)
Record = Callable[..., None]
#: tests only: the KVMSNAP_FAULT value that hangs the parent's QEMU before the disk snapshot
HANG_POINT = "hang-parent"
#: the work directory's subdirectory for the parent's overlays of block-device disks
BLOCK_OVERLAYS = "overlays"
#: how often the pause asks whether the capture is done: each wait ends the pause later
CAPTURE_POLL = 0.002


def _forget(**fields: Any) -> None:
    """No journal to write to."""


# -- the facade the pipeline uses ----------------------------------------------------------------
class ParentHandle:
    """The parent VM for one run, whatever its backend (``with open_parent(job) as parent``)."""

    def __init__(self, backend: Backend, clone_drop: Sequence[str] = ()) -> None:
        self.backend = backend
        self.name = "the VM"
        self.clone_drop = tuple(clone_drop)  # --clone-drop: what the clone leaves out

    def __enter__(self) -> ParentHandle:
        self.backend.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.__exit__(*exc)

    def describe(self) -> Parent:
        """The VM, checked for clonability (raises VMError otherwise)."""
        parent = self.backend.describe()
        self.name = parent.name
        return parent if parent.offline else clonable(parent, self.clone_drop)

    def fork(self, parent: Parent, planned: tuple[ForkedDisk, ...], state_file: Path,
             method: RamMethod | str, *, max_pause: float = MAX_PAUSE,
             record: Record | None = None) -> ForkPoint:
        """Pause, snapshot disks and RAM at one instant, resume; undo on failure.

        ``record(**fields)`` writes the journal: the migration settings to put back, and
        that kvmsnap started its RAM snapshot (recovery touches no other migration). The
        returned disks carry the frozen images' stamps: record them too.
        """
        return take_fork(self.backend, parent, planned, state_file, method=method,
                         max_pause=max_pause, record=record or _forget)

    def commit_back(self, disks: Sequence[ForkedDisk]) -> list[Commit]:
        """Give the parent its chain back: commit each overlay where it is, delete it."""
        return commit_back(self.backend, disks)

    def check_healthy(self) -> None:
        """Raise HostError if the parent stopped on an I/O error (e.g. its overlay's
        filesystem is full): the run should stop, give the chain back and resume it."""
        stopped = io_error(self.backend.monitor)
        if stopped:
            raise HostError(f"{self.name} stopped on an I/O error during the backup: "
                            f"{stopped}", "free space there, or pass --overlay-dir on a "
                            "larger filesystem; kvmsnap commits the VM's writes back into "
                            "its images and resumes it")

    def journal_fields(self) -> dict[str, Any]:
        """What recovery needs to find this VM again after a crash (for journal.start)."""
        return self.backend.journal_fields()


def open_parent(job: BackupJob) -> ParentHandle:
    """The parent VM of ``job``: its libvirt domain if it names one, else its QMP socket."""
    if job.domain:
        return ParentHandle(LibvirtBackend(job.domain, job.libvirt_uri), job.fork.clone_drop)
    return ParentHandle(QmpBackend(job.qmp, job.fork.pid), job.fork.clone_drop)


def parent_overlay_path(disk: ParentDisk, run_id: str, overlay_dir: Path | None,
                        workdir: Path = DEFAULT_WORKDIR) -> Path:
    """Where the parent writes during the backup: next to its image unless told otherwise.

    Next to the image means the same filesystem and the same persistence as the image, so
    a host crash mid-backup leaves a chain that ``kvmsnap recover`` can commit. A block
    device has none (/dev is no place for files): WORKDIR/overlays, which outlives the
    run's own directory (removed at the end even if the commit back failed).
    """
    frozen = Path(disk.filename)
    if disk.host_device:  # /dev/vg0/data and /dev/vg1/data get different names
        name = safe_name(str(frozen).removeprefix("/dev/").replace("/", "-"))
        return (overlay_dir or workdir / BLOCK_OVERLAYS) / f"{name}.kvmsnap-{run_id}.qcow2"
    directory = overlay_dir or frozen.parent
    return directory / f"{frozen.name}.kvmsnap-{run_id}.qcow2"


def plan_fork(parent: Parent, run_id: str, overlay_dir: Path | None,
              workdir: Path = DEFAULT_WORKDIR) -> tuple[ForkedDisk, ...]:
    """The parent's overlays-to-be: recorded in the journal before they exist."""
    return tuple(ForkedDisk(disk, parent_overlay_path(disk, run_id, overlay_dir, workdir),
                            f"kvmsnap-{run_id}-{index}")
                 for index, disk in enumerate(parent.writable_disks))


# -- the fork -------------------------------------------------------------------------------------
def take_fork(backend: Backend, parent: Parent, planned: tuple[ForkedDisk, ...],
              state_file: Path, *, method: RamMethod | str = RamMethod.AUTO,
              timeout: float = FORK_TIMEOUT, max_pause: float = MAX_PAUSE,
              record: Record = _forget) -> ForkPoint:
    """Fork the parent's disks and RAM at one instant. The parent runs again on return.

    On failure the parent is resumed and its chain restored before the error propagates;
    its migration settings are put back either way.
    """
    if parent.offline:
        raise VMError(f"{parent.name} is shut off: there is nothing to fork",
                      "back its images up directly (the pipeline does, for offline VMs)")
    # The clone's secrets, as files: libvirt deletes the domain's master key when it
    # stops (the clone starts later), and inline data must not reach a clone's argv.
    write_clone_secrets(parent.argv, state_file.parent, Path(f"/proc/{parent.pid}/root"))
    monitor = backend.monitor
    settings = ram.migration_settings(monitor)
    record(migration_settings=settings)
    try:
        chosen = RamMethod(ram.configure_migration(monitor, method, settings))
        ram.check_pause(monitor, chosen, max_pause)  # before anything else is made
        point = _fork_on_overlays(backend, parent, planned, state_file, chosen, timeout,
                                  record)
    finally:
        if ram.restore_settings(monitor, settings):
            record(migration_settings=None, migration_started=False)
    return point


def _fork_on_overlays(backend: Backend, parent: Parent, planned: tuple[ForkedDisk, ...],
                      state_file: Path, method: RamMethod, timeout: float,
                      record: Record) -> ForkPoint:
    """Attach the overlays and fork onto them; give everything back if that fails."""
    _attach_overlays(backend, planned)
    progress = _Progress()
    writer: ram.StateSink | None = None
    try:
        writer = ram.open_state_fd(backend.monitor, state_file, method)
        # Before the pause, not inside it (a journal write costs an fsync): from here on a
        # migration that has not ended is taken for kvmsnap's own by `kvmsnap recover`.
        record(migration_started=True)
        log.info("pausing %s for the fork (%s)", parent.name, method)
        point = _pause_and_snapshot(backend, parent, planned, state_file, method, timeout,
                                    progress, writer.channel.uri)
        writer.finish()
    except BaseException as error:
        _undo(backend, planned, progress, error)
        state_file.unlink(missing_ok=True)
        raise
    finally:
        if writer:
            writer.close()
    return replace(point, disks=_stamped(planned))


def _stamped(planned: Sequence[ForkedDisk]) -> tuple[ForkedDisk, ...]:
    """The forked disks with what proves each frozen image unchanged from now on."""
    stamped = []
    for disk in planned:
        try:
            stamped.append(replace(disk, frozen_stamp=stamp_of(disk.frozen)))
        except OSError as exc:  # an offline commit will then refuse: it cannot prove much
            log.warning("cannot stamp the frozen image %s: %s", disk.frozen, exc.strerror)
            stamped.append(disk)
    return tuple(stamped)


def _attach_overlays(backend: Backend, planned: Sequence[ForkedDisk]) -> None:
    """Before the pause: libvirt creating the overlays itself doubles it (~80 vs ~40 ms)."""
    try:
        for forked in planned:
            disk = forked.disk
            if disk.host_device:  # its own directory, not an image's: make or check it
                dirs.user_dir(forked.parent_overlay.parent, "the directory of the parent's "
                              "overlays (--overlay-dir)")
            create_overlay(forked.parent_overlay, disk.filename, disk.format, disk.virtual_size)
        backend.attach_overlays(planned)
    except BaseException:
        _detach_overlays(backend, planned)
        raise


def _detach_overlays(backend: Backend, planned: Sequence[ForkedDisk]) -> None:
    """The overlays were never any disk's layer: they hold nothing."""
    backend.detach_overlays(planned)
    for forked in planned:
        try:
            delete_overlay(forked, backend.monitor)
        except KvmsnapError as exc:
            log.warning("%s (the journal keeps it for `kvmsnap recover`)", exc)


@dataclass
class _Progress:
    """How far a fork got: what its undo has to give back."""

    paused: bool = False  # kvmsnap sent `stop`
    applied: bool = False  # the disk snapshot returned: the overlays are the disks' tops
    migrating: bool = False  # kvmsnap's RAM snapshot may run


def _pause_and_snapshot(backend: Backend, parent: Parent, planned: Sequence[ForkedDisk],
                        state_file: Path, method: RamMethod, timeout: float,
                        progress: _Progress, uri: str) -> ForkPoint:
    monitor = backend.monitor
    monitor.events()  # forget older events: STOP/RESUME below must be ours
    progress.paused = True
    backend.pause()
    stop = monitor.wait_event("STOP", 10)
    faults.point("paused")
    _hang_for_tests(parent.pid)
    started = time.monotonic()
    backend.snapshot_disks(planned, f"kvmsnap-{state_file.parent.name}")
    progress.applied = True
    disk_ms = (time.monotonic() - started) * 1000
    faults.point("disk-snapshot")
    progress.migrating = True
    try:
        monitor.execute("migrate", {"uri": uri})
    except VMError:
        progress.migrating = False  # refused: a migration that runs now is not ours
        raise
    faults.point("ram-save")
    resume = _wait_for_resume(backend, method, timeout)
    progress.paused = False
    pause_ms = (resume.timestamp - stop.timestamp) * 1000
    log.info("%s ran again after %.1f ms; saving its RAM", parent.name, pause_ms)
    info = ram.wait_migration(monitor, timeout)
    memory = info.get("ram", {})
    return ForkPoint(parent, tuple(planned), state_file, method, pause_ms, disk_ms,
                     info.get("total-time", 0) / 1000, int(memory.get("total", 0)),
                     info.get("downtime"))


def _hang_for_tests(pid: int) -> None:
    """Tests only: ``KVMSNAP_FAULT=hang-parent`` stops the parent's QEMU (SIGSTOP) just
    before the disk snapshot, as a monitor stuck in a slow flush would be; the test lets it
    go on (SIGCONT)."""
    if os.environ.get("KVMSNAP_FAULT") == HANG_POINT:
        os.kill(pid, signal.SIGSTOP)


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
            return monitor.wait_event("RESUME", CAPTURE_POLL)
        except StepTimeout:
            pass
        info = monitor.execute("query-migrate")
        status = info.get("status")
        if status in MIGRATION_FAILED:
            raise VMError(f"the RAM snapshot {status}", "see the VM's QEMU log")
        if status == "completed" or ram.capture_done(info):
            ram.resume_after_capture(backend)
            return monitor.wait_event("RESUME", 10)
    raise StepTimeout(f"the RAM snapshot did not capture the VM within {timeout:g} s")


# -- undo -----------------------------------------------------------------------------------------
class Applied(Enum):
    """Did the disk snapshot take? "Don't know" is not "no"."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"


def snapshot_outcome(backend: Backend, planned: Sequence[ForkedDisk],
                     attempts: int = 3) -> Applied:
    """Ask QEMU's block graph whether any planned overlay is in a disk's chain; a monitor
    that does not answer, after ``attempts`` questions, makes it UNKNOWN."""
    for attempt in range(1, attempts + 1):
        try:
            places = [locate(backend.monitor, disk) for disk in planned]
        except KvmsnapError as exc:
            log.warning("is the disk snapshot in place? no answer (%d of %d): %s", attempt,
                        attempts, exc)
            continue
        return Applied.YES if any(p.layer is not Layer.UNUSED for p in places) else Applied.NO
    return Applied.UNKNOWN


def _undo(backend: Backend, planned: Sequence[ForkedDisk], progress: _Progress,
          error: BaseException) -> None:
    """After a failed fork: the parent runs, on its original chain, holding every write.

    When kvmsnap cannot tell whether the disks moved onto the overlays, it keeps every
    file and says so: deleting an overlay the VM writes to would lose those writes.
    """
    _resume_after_failure(backend, progress)
    outcome = Applied.YES if progress.applied else snapshot_outcome(backend, planned)
    if outcome is Applied.UNKNOWN:
        unknown = VMError(f"the fork failed ({error}) and whether the VM's disks moved onto "
                          "kvmsnap's overlays is unknown: every file is kept",
                          "run `kvmsnap recover` once the VM's monitor answers again; it asks "
                          "again and gives the disks back")
        if isinstance(error, Exception):
            raise unknown from error
        log.error("%s", unknown.one_line())  # an interrupt propagates as it is
        return
    try:
        if outcome is Applied.YES:
            commit_back(backend, planned)
        else:
            _detach_overlays(backend, planned)
    except KvmsnapError as exc:
        log.error("could not restore the parent's disk chain: %s (run `kvmsnap recover`)", exc)


def _resume_after_failure(backend: Backend, progress: _Progress) -> None:
    """Let our RAM snapshot end and resume the VM if our pause holds it; never raises."""
    try:
        if progress.migrating:
            ram.settle_migration(backend.monitor)
        if progress.paused:
            # Without a migration of ours, postmigrate means someone else's moved the VM.
            states = ram.PAUSED if progress.migrating else ("paused",)
            ram.resume_if_paused(backend, states=states)
    except KvmsnapError as exc:
        log.error("could not resume the parent after a failed fork: %s", exc)
