"""The pipeline: fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup.

Each step is a function taking the records of the steps before it (from
:mod:`kvmsnap_plugin.model`) and returning its own. Cleanup is an ExitStack filled as
resources come into being, so it always runs, in reverse order: whatever reads the clone's
disks has finished before the parent's overlays are committed back into the frozen images
those disks are built on. The connection to the parent is opened around that stack, so the
commit back still has it, and a split backup (:func:`mount`) empties the stack and leaves
everything in place but that connection.

Before the pause the run must fit (space and memory, :mod:`kvmsnap_plugin.host.resources`),
and between steps the parent must run: stopped on an I/O error, it ends the run early.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmsnap_plugin.disks import classify, verify
from kvmsnap_plugin.disks.expose import add_file, expose, unexpose
from kvmsnap_plugin.errors import SkipBackup, VMError
from kvmsnap_plugin.fork.engine import ParentHandle, open_parent, parent_overlay_path, plan_fork
from kvmsnap_plugin.fork.watchdog import guarding
from kvmsnap_plugin.host import faults, process
from kvmsnap_plugin.host.hugepages import (
    Recollapse,
    collapse_before_fork,
    shortens_the_pause,
    warm_guest_ram,
)
from kvmsnap_plugin.host.images import keep_images
from kvmsnap_plugin.host.resources import make_workdir
from kvmsnap_plugin.model import (
    METADATA_FILE,
    ArchiveResult,
    BackupJob,
    BackupReport,
    CloneBinary,
    ClonePlan,
    Collapse,
    Commit,
    Exposure,
    ForkPoint,
    Label,
    Mode,
    Parent,
    PartitionRecord,
    Phase,
    Plan,
    RamMethod,
    Recovery,
    ShutdownResult,
    TargetFailure,
    Verdict,
)
from kvmsnap_plugin.paths import safe_name, socket_dir
from kvmsnap_plugin.plugin.archive import reads_whole_loop_devices
from kvmsnap_plugin.plugin.manager import Hooks
from kvmsnap_plugin.run import metadata
from kvmsnap_plugin.run.journal import (
    Journal,
    pending_journal,
    refuse_if_mounted,
    vm_identity,
)
from kvmsnap_plugin.run.logs import log_as_vm
from kvmsnap_plugin.run.recovery import recover
from kvmsnap_plugin.run.report import warnings_of
from kvmsnap_plugin.run.targets import archive_each, checked_targets
from kvmsnap_plugin.run.watch import watching
from kvmsnap_plugin.vm.clone import (
    check_room,
    images_to_archive,
    label_of,
    plan_clone,
    prepare_overlays,
    running_clone,
)
from kvmsnap_plugin.vm.shutdown import shut_down

log = logging.getLogger(__name__)

#: how an offline backup's "clone" ended: there was none, the VM was already shut off
OFFLINE = ShutdownResult(clean=True, ended_by="offline", seconds=0.0, presses=0,
                         reason="shut off before the backup")
#: numbers the runs of this process: VMs backed up at once, in the same second, get
#: distinct run ids (and so distinct overlays in a shared --overlay-dir)
_RUN_NUMBERS = itertools.count(1)


@dataclass(frozen=True)
class Run:
    """One run of the pipeline on one VM: what every step needs to know."""

    job: BackupJob
    hooks: Hooks
    journal: Journal
    workdir: Path  # private (0700): it holds the guest's RAM
    id: str  # names the parent's overlays and ties the archives of this run together
    parent: ParentHandle | None = None  # a running parent (None: shut off, no fork)
    commits: list[Commit] = field(default_factory=list)  # filled as the parent is given back
    #: targets that got no archive (their repository failed); the others were still tried
    failed_targets: list[TargetFailure] = field(default_factory=list)
    #: the huge pages' rebuild after the RAM snapshot, running while the clone shuts down
    recollapse: list[Recollapse] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return mount_root(self.job)


@dataclass(frozen=True)
class Stopped:
    """The clone is down: how it ended, and the images whose disks are to be archived."""

    point: ForkPoint
    shutdown: ShutdownResult
    restore_s: float  # loading the clone from the RAM state
    label: Label
    images: list[tuple[str, Path, str]]  # (device, clone overlay or frozen image, format)
    binary: CloneBinary | None = None  # the QEMU the clone ran


@dataclass(frozen=True)
class Results:
    """What was made of the exposed disks."""

    archives: list[ArchiveResult]
    verdicts: list[Verdict]
    kept: list[str]
    partitions: list[PartitionRecord]


# -- the entry points ---------------------------------------------------------------------------
def backup(job: BackupJob, hooks: Hooks | None = None) -> BackupReport:
    """Back up one VM. Plugins' cleanup hooks run whatever happens."""
    return _with_cleanup_hooks(job, hooks or Hooks(), detach=False)


def mount(job: BackupJob, hooks: Hooks | None = None) -> BackupReport:
    """The first half of a split backup: fork, shut the clone down, mount its filesystems
    under the mount root and leave them there (for borgmatic or a wrapper script to
    archive). :func:`release` undoes it all and gives the parent its chain back."""
    return _with_cleanup_hooks(job, hooks or Hooks(), detach=True)


def release(job: BackupJob) -> Recovery:
    """The second half of a split backup: unmount, stop the exports, commit the parent."""
    journal = pending_journal(job)
    if journal is None:
        return Recovery(job.name, ["nothing to release"])
    with journal:
        return _recover_or_fail(journal)


def plan(job: BackupJob) -> Plan:
    """Describe what :func:`backup` would do, touching nothing."""
    clone = None
    with open_parent(job) as handle:
        parent = handle.describe()
        job = named(job, parent.name)
        if not parent.offline:
            with tempfile.TemporaryDirectory() as tmp:
                clone = plan_clone(parent, Path(tmp), Path(tmp), monitor=handle.backend.monitor)
    disks = [{"device": d.device, "image": d.filename,
              "overlay": "none (shut off: read as it is)" if parent.offline else
              str(parent_overlay_path(d, "RUN", job.fork.overlay_dir, job.fork.workdir))}
             for d in parent.writable_disks]
    argv = metadata.without_secrets(clone.argv) if clone else []
    return Plan(parent.name, parent.pid, disks, argv,
                [f"{t.name} ({t.type}, {t.mode})" for t in job.targets],
                str(mount_root(job)), clone.binary.describe() if clone and clone.binary else "")


def named(job: BackupJob, name: str) -> BackupJob:
    """The job under the VM's own name if none was given; log lines say it from now on."""
    job = job.named(name)
    log_as_vm(job.name)
    return job


def mount_root(job: BackupJob) -> Path:
    """Stable per VM: restic records absolute paths, and borgmatic names a fixed path."""
    return job.fork.mount_root or job.fork.workdir / "mnt" / safe_name(job.name)


# -- around a run: the plugins' cleanup, the lock, recovery before and after ---------------------
def _with_cleanup_hooks(job: BackupJob, hooks: Hooks, detach: bool) -> BackupReport:
    report, error = None, None
    try:
        report = _locked(job, hooks, detach)
        return report
    except BaseException as exc:
        error = exc
        raise
    finally:
        hooks.cleanup(job, report, error)


def _locked(job: BackupJob, hooks: Hooks, detach: bool) -> BackupReport:
    with Journal.acquire(vm_identity(job)) as journal:
        refuse_if_mounted(job, journal)
        if journal.pending:
            log.warning("%s: a previous run did not finish; cleaning up after it first",
                        job.name)
            _recover_or_fail(journal)
        try:
            report = _backup(job, hooks, journal, detach)
        finally:
            if not (detach and journal.current.phase is Phase.MOUNTED):
                _final_sweep(journal)
        return report


def _final_sweep(journal: Journal) -> None:
    """Whatever the run's own cleanup could not undo, the journal still knows."""
    if journal.pending:
        done = recover(journal)
        for action in done.actions:
            log.warning("cleaned up: %s", action)


def _recover_or_fail(journal: Journal) -> Recovery:
    done = recover(journal)
    if done.problems:
        raise VMError(f"{done.vm}: recovery left problems: {'; '.join(done.problems)}",
                      "fix them (see the messages) and run `kvmsnap recover` again")
    return done


# -- the run ------------------------------------------------------------------------------------
def _backup(job: BackupJob, hooks: Hooks, journal: Journal, detach: bool) -> BackupReport:
    started = time.monotonic()
    with open_parent(job) as handle:
        parent = handle.describe()
        job = named(job, parent.name)
        if not parent.offline:  # refuse what cannot fit while the VM runs untouched
            check_room(parent, handle.backend.monitor, job.fork, {parent_overlay_path(
                d, "RUN", job.fork.overlay_dir, job.fork.workdir).parent
                for d in parent.writable_disks})
        # Before pre_backup: a plugin may freeze the guest's filesystems there until the fork.
        huge_pages = (collapse_before_fork(parent.pid, job.fork.collapse_budget)
                      if shortens_the_pause(parent, job.fork) else None)
        job, failed_targets = checked_targets(job, hooks, parent)
        reason = hooks.pre_backup(job, parent)
        if reason:
            raise SkipBackup(f"{job.name}: skipped by a plugin: {reason}")
        with contextlib.ExitStack() as cleanup:
            run = _start(job, hooks, journal, handle, parent)
            run.failed_targets.extend(failed_targets)
            cleanup.callback(shutil.rmtree, run.workdir, ignore_errors=True)
            if parent.offline:  # a shut-off VM: its images are consistent as they are
                stopped = _offline(run, parent)
            else:
                stopped = _fork_and_shut_down(run, handle, parent, cleanup)
            with watching(run.parent):  # a parent stopped on ENOSPC ends these steps now
                exposure = _expose(run, stopped, cleanup)
                hooks.post_shutdown(job, stopped.point, exposure, stopped.label)
                results = _archive_and_verify(run, stopped, exposure)
            _check_parent(run)
            if detach:
                journal.record(phase=Phase.MOUNTED)
                cleanup.pop_all()  # everything stays, for `kvmsnap release`
    report = _report(run, stopped, results, huge_pages, time.monotonic() - started)
    log.info("%s: %s in %.1f s", job.name, f"mounted at {run.root}" if detach else "done",
             report.total_s)
    return report


def _start(job: BackupJob, hooks: Hooks, journal: Journal, handle: ParentHandle,
           parent: Parent) -> Run:
    """Journal the run, then make its work directory."""
    journal.start(vm=job.name, identity=journal.identity, phase=Phase.PREPARING,
                  mount_root=str(mount_root(job)), **handle.journal_fields())
    workdir = make_workdir(job.fork.workdir, parent.name)
    journal.record(workdir=str(workdir))
    return Run(job, hooks, journal, workdir,
               f"{os.getpid()}-{int(time.time())}-{next(_RUN_NUMBERS)}",
               None if parent.offline else handle)


def _check_parent(run: Run) -> None:
    """Between steps: abort early when the parent stopped on an I/O error (e.g. its
    overlay's filesystem is full); the cleanup then commits back and resumes it."""
    if run.parent is not None:
        run.parent.check_healthy()


def _offline(run: Run, parent: Parent) -> Stopped:
    """A shut-off VM: no fork, no clone; its own images are archived as they are."""
    point = ForkPoint(parent, (), run.workdir / "no-ram-state", RamMethod.OFFLINE,
                      0.0, 0.0, 0.0, 0, None)
    run.hooks.snapshot(run.job, point)
    log.info("%s is shut off: archiving its disk images as they are, without a fork",
             parent.name)
    images = [(d.device, Path(d.filename), d.format) for d in parent.writable_disks]
    return Stopped(point, OFFLINE, 0.0, Label.CLEAN, images)


# -- fork -> clone -> shutdown ------------------------------------------------------------------
def _fork_and_shut_down(run: Run, handle: ParentHandle, parent: Parent,
                        cleanup: contextlib.ExitStack) -> Stopped:
    """The commit back is left on ``cleanup``: it runs once nothing reads the disks."""
    sockets = cleanup.enter_context(socket_dir())
    run.journal.record(sockets=str(sockets))
    clone_plan = plan_clone(parent, run.workdir, sockets, run.job.fork.clone_console,
                            handle.backend.monitor)
    prepare_overlays(clone_plan, parent.writable_disks)
    point = _fork(run, handle, parent)
    cleanup.callback(_give_back, run, handle, point)
    run.hooks.snapshot(run.job, point)
    with watching(handle):
        return _shut_down_clone(run, clone_plan, point)


def _fork(run: Run, handle: ParentHandle, parent: Parent) -> ForkPoint:
    planned = plan_fork(parent, run.id, run.job.fork.overlay_dir, run.job.fork.workdir)
    run.journal.record(phase=Phase.FORKING, overlays=planned)
    if shortens_the_pause(parent, run.job.fork):  # hugepages.py: a shorter prepare step
        log.info("read %d pages of guest RAM ahead of the pause", warm_guest_ram(parent.pid))
    with guarding(handle.journal_fields()):  # resumes the parent if kvmsnap dies paused
        point = handle.fork(parent, planned, run.workdir / "ram.state", run.job.fork.method,
                            max_pause=run.job.fork.max_pause, record=run.journal.record)
    run.journal.record(phase=Phase.FORKED, overlays=point.disks)  # with the images' stamps
    if run.job.fork.collapse_huge_pages and point.method is RamMethod.BACKGROUND:
        run.recollapse.append(Recollapse(parent.pid, run.job.fork.collapse_budget))
    return point


def _give_back(run: Run, handle: ParentHandle, point: ForkPoint) -> None:
    """Commit the parent's overlays back into its frozen images."""
    run.commits.extend(handle.commit_back(point.disks))
    run.journal.record(overlays=[])


def _shut_down_clone(run: Run, clone_plan: ClonePlan, point: ForkPoint) -> Stopped:
    policy = run.job.fork.shutdown

    def started(pid: int) -> None:
        run.journal.record(clone=process.identity(pid))

    with running_clone(clone_plan, point.state_file, on_start=started) as clone:
        result = shut_down(clone, policy, clone_plan.agent_socket)
        restore_s = clone.restore_s
    label = label_of(result, policy.on_unclean)
    return Stopped(point, result, restore_s, label, images_to_archive(clone_plan, label),
                   clone_plan.binary)


# -- expose -> archive -> verify ----------------------------------------------------------------
def _expose(run: Run, stopped: Stopped, cleanup: contextlib.ExitStack) -> Exposure:
    """The disks to archive, read-only, with the VM's record beside them."""
    run.journal.record(clone=None, phase=Phase.SHUT_DOWN)
    image_only = bool(run.job.targets) and all(t.mode is Mode.IMAGE for t in run.job.targets)
    exposed = expose(stopped.images, run.workdir, run.root, recorder=run.journal,
                     skip=run.job.fork.skip_partitions, luks_keys=run.job.fork.luks_keys,
                     flash={d.device for d in stopped.point.parent.writable_disks if d.flash},
                     guestfs=not image_only,
                     direct_io=reads_whole_loop_devices(run.job))
    cleanup.callback(unexpose, exposed)
    record = metadata.record_of(stopped.point, run.id, stopped.label, run.job.name)
    add_file(exposed.view, METADATA_FILE, record.to_json(), run.journal)
    run.journal.record(phase=Phase.EXPOSED)
    return exposed.view


def _archive_and_verify(run: Run, stopped: Stopped, exposure: Exposure) -> Results:
    faults.point("archiving")
    archives, failures = archive_each(run.job, run.hooks, exposure, stopped.label)
    run.failed_targets.extend(failures)
    image_only = bool(run.job.targets) and all(t.mode is Mode.IMAGE for t in run.job.targets)
    verdicts = verify.verdicts(classify.to_verdict(exposure.filesystems, image_only))
    keep_dir = run.job.fork.keep_dir
    kept = [str(p) for p in keep_images(stopped.images, keep_dir, run.job.name)] if keep_dir else []
    return Results(archives, verdicts, kept, classify.records(exposure.filesystems, image_only))


# -- the report ---------------------------------------------------------------------------------
def _report(run: Run, stopped: Stopped, results: Results, huge_pages: Collapse | None,
            total_s: float) -> BackupReport:
    point = stopped.point
    return BackupReport(
        point.parent.name, stopped.label, point.method, point.pause_ms, point.disk_snapshot_ms,
        point.ram_bytes, point.ram_save_s, point.qemu_downtime_ms, stopped.restore_s,
        stopped.shutdown, results.verdicts, results.archives, results.kept, run.commits,
        total_s, warnings_of(stopped.label, results.verdicts, results.archives,
                             results.partitions),
        huge_pages=huge_pages, clone_binary=stopped.binary, partitions=results.partitions,
        huge_pages_after=run.recollapse[0].result() if run.recollapse else None,
        failed_targets=run.failed_targets)
