"""The pipeline: fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup.

Each step is a module; data flows one way through small frozen dataclasses. Cleanup is an
ExitStack filled as resources come into being, so it always runs, in reverse order:
whatever reads the clone's disks has finished before the parent's overlays are committed
back into the frozen images those disks are built on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmsnap_plugin.backends import ParentBackend
from kvmsnap_plugin.backends.qmp import QmpParent
from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.disks.expose import add_file, expose, unexpose
from kvmsnap_plugin.errors import HostError, KvmsnapError, SkipBackup, VMError
from kvmsnap_plugin.fork.engine import parent_overlay_path, plan_fork
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.hugepages import collapse_before_fork
from kvmsnap_plugin.host.images import keep_images
from kvmsnap_plugin.model import (
    METADATA_FILE,
    ArchiveResult,
    BackupJob,
    BackupReport,
    ClonePlan,
    Collapse,
    Commit,
    ForkOptions,
    ForkPoint,
    FsState,
    Label,
    Parent,
    Phase,
    Plan,
    Recovery,
    ShutdownPolicy,
    ShutdownResult,
)
from kvmsnap_plugin.paths import safe_name, socket_dir
from kvmsnap_plugin.plugin.archive import archive_all
from kvmsnap_plugin.plugin.manager import Hooks
from kvmsnap_plugin.run import metadata
from kvmsnap_plugin.run.journal import Journal, read_state
from kvmsnap_plugin.run.recovery import recover
from kvmsnap_plugin.vm.clone import plan_clone, prepare_overlays, running_clone
from kvmsnap_plugin.vm.shutdown import shut_down

log = logging.getLogger("kvmsnap")





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
    with Journal.acquire(job.identity) as journal:
        if not journal.pending:
            return Recovery(job.name, ["nothing to release"])
        return _recover_or_fail(journal)


def recover_all() -> list[Recovery]:
    """Finish or undo every interrupted run this host has a journal of."""
    results = []
    for path in Journal.all_pending():
        try:
            state = read_state(path)
        except KvmsnapError as exc:
            results.append(Recovery(path.stem, problems=[str(exc)]))
            continue
        try:
            with Journal.acquire(state.identity) as journal:
                if journal.pending:
                    results.append(recover(journal))
        except KvmsnapError as exc:
            results.append(Recovery(state.vm or path.stem, problems=[str(exc)]))
    return results


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
    with Journal.acquire(job.identity) as journal:
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


def plan(job: BackupJob) -> Plan:
    """Describe what :func:`backup` would do, touching nothing."""
    with open_backend(job) as backend:
        parent = backend.describe()
    argv: list[str] = []
    if not parent.offline:
        with tempfile.TemporaryDirectory() as tmp:
            argv = list(plan_clone(parent, Path(tmp), Path(tmp)).argv)
    disks = [{"device": d.device, "image": d.filename,
              "overlay": "none (shut off: read as it is)" if parent.offline else
              str(parent_overlay_path(d, "RUN", job.fork.overlay_dir))}
             for d in parent.writable_disks]
    return Plan(parent.name, parent.pid, disks, argv,
                [f"{t.name} ({t.type}, {t.mode})" for t in job.targets],
                str(mount_root(job)))


def open_backend(job: BackupJob) -> ParentBackend:
    """The parent VM's backend: libvirt for a domain, else its QMP socket."""
    if job.domain:
        from kvmsnap_plugin.backends.libvirt import LibvirtParent

        return LibvirtParent(job.domain, job.libvirt_uri)
    return QmpParent(job.qmp, job.fork.pid)


def mount_root(job: BackupJob) -> Path:
    """Stable per VM: restic records absolute paths, and borgmatic names a fixed path."""
    return job.fork.mount_root or job.fork.workdir / "mnt" / safe_name(job.name)


def _backup(job: BackupJob, hooks: Hooks, journal: Journal, detach: bool) -> BackupReport:
    started = time.monotonic()
    options = job.fork
    root = mount_root(job)
    commits: list[Commit] = []
    with contextlib.ExitStack() as cleanup:
        backend = cleanup.enter_context(open_backend(job))
        parent = backend.describe()
        # Before pre_backup: a plugin may freeze the guest's filesystems there until the fork.
        huge_pages = _collapse_huge_pages(parent, options)
        reason = hooks.pre_backup(job, parent)
        if reason:
            raise SkipBackup(f"{job.name}: skipped by a plugin: {reason}")
        journal.start(vm=job.name, identity=job.identity, phase=Phase.PREPARING,
                      mount_root=str(root), **backend.journal_fields())
        workdir = _make_workdir(options.workdir, parent)
        journal.record(workdir=str(workdir))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        run_id = f"{os.getpid()}-{int(time.time())}"
        if parent.offline:  # a shut-off VM: its images are consistent as they are
            point, stopped, restore_s = _offline_point(parent, workdir), OFFLINE, 0.0
            hooks.snapshot(job, point)
            label, images = Label.CLEAN, [(d.device, Path(d.filename)) for d in parent.writable_disks]
            log.info("%s is shut off: archiving its disk images as they are, without a fork",
                     parent.name)
        else:
            point, stopped, restore_s, label, images = _fork_and_shut_down(
                job, hooks, backend, parent, journal, cleanup, workdir, run_id, commits)
        journal.record(clone=None, phase=Phase.SHUT_DOWN)
        exposed_disks = expose(images, workdir, root, recorder=journal)
        cleanup.callback(unexpose, exposed_disks)
        exposure = exposed_disks.view
        add_file(exposure, METADATA_FILE,
                 metadata.record_of(point, run_id, label, job.name).to_json(), journal)
        journal.record(phase=Phase.EXPOSED)
        hooks.post_shutdown(job, point, exposure, label)
        archives: list[ArchiveResult] = archive_all(hooks, job, exposure, label)
        verdicts = verify.verdicts(exposure.filesystems)
        kept = ([str(p) for p in keep_images(images, options.keep_dir)]
                if options.keep_dir else [])
        if detach:
            journal.record(phase=Phase.MOUNTED)
            cleanup.pop_all()  # everything stays, for `kvmsnap release`
            backend.__exit__(None, None, None)
    report = BackupReport(parent.name, label, point.method, point.pause_ms,
                          point.disk_snapshot_ms, point.ram_bytes, point.ram_save_s,
                          point.qemu_downtime_ms, restore_s, stopped, verdicts, archives, kept,
                          commits, time.monotonic() - started, _warnings(label, verdicts,
                                                                         archives),
                          huge_pages=huge_pages)
    log.info("%s: %s in %.1f s", job.name, f"mounted at {root}" if detach else "done",
             report.total_s)
    return report


def _collapse_huge_pages(parent: Parent, options: ForkOptions) -> Collapse | None:
    """Opt-in: shorter background-snapshot pauses, see hugepages.py."""
    if (not options.collapse_huge_pages or parent.offline
            or options.method == "stop-and-copy"):  # its pause copies RAM, pages or not
        return None
    return collapse_before_fork(parent.pid)


def _fork_and_shut_down(job: BackupJob, hooks: Hooks, backend: ParentBackend, parent: Parent,
                        journal: Journal, cleanup: contextlib.ExitStack, workdir: Path,
                        run_id: str, commits: list[Commit]):
    """fork -> clone -> shutdown; the commit back is left on ``cleanup``."""
    options = job.fork
    sockets = cleanup.enter_context(socket_dir())
    journal.record(sockets=str(sockets))
    clone_plan = plan_clone(parent, workdir, sockets, options.clone_console)
    prepare_overlays(clone_plan, parent.writable_disks)
    planned = plan_fork(parent, run_id, options.overlay_dir)
    journal.record(phase=Phase.FORKING, overlays=planned)
    point = backend.fork(parent, planned, workdir / "ram.state", options.method)
    journal.record(phase=Phase.FORKED)

    def give_back() -> None:
        commits.extend(backend.commit_back(point.disks))
        journal.record(overlays=[])

    cleanup.callback(give_back)
    hooks.snapshot(job, point)
    stopped, restore_s = _run_clone(clone_plan, point.state_file, options.shutdown,
                                    lambda pid: journal.record(clone=process.identity(pid)))
    label = _label(stopped, options.shutdown)
    return point, stopped, restore_s, label, _images(clone_plan, label)


#: how an offline backup's "clone" ended: there was none, the VM was already shut off
OFFLINE = ShutdownResult(clean=True, ended_by="offline", seconds=0.0, presses=0,
                         reason="shut off before the backup")


def _offline_point(parent: Parent, workdir: Path) -> ForkPoint:
    """The "fork point" of a shut-off VM: no pause, no RAM, no overlays."""
    return ForkPoint(parent, (), workdir / "no-ram-state", "offline", 0.0, 0.0, 0.0, 0, None)


def _run_clone(clone_plan: ClonePlan, state_file: Path, policy: ShutdownPolicy,
               on_start: Callable[[int], None]) -> tuple[ShutdownResult, float]:
    with running_clone(clone_plan, state_file, on_start=on_start) as clone:
        return shut_down(clone, policy, clone_plan.agent_socket), clone.restore_s


def _images(clone_plan: ClonePlan, label: str) -> list[tuple[str, Path]]:
    """The clone's disks, or the frozen (crash-consistent) images for a labelled fallback."""
    if label == Label.CLEAN:
        return [(d.device, d.overlay) for d in clone_plan.disks]
    return [(d.device, d.frozen) for d in clone_plan.disks]


def _label(stopped: ShutdownResult, policy: ShutdownPolicy) -> str:
    if stopped.clean:
        return Label.CLEAN
    if policy.on_unclean == "crash-consistent":
        log.warning("the clone did not shut down cleanly (%s): using the crash-consistent "
                    "images of the fork instant, labelled as such", stopped.reason)
        return Label.CRASH_CONSISTENT
    raise VMError(f"the clone did not shut down cleanly ({stopped.reason}); nothing was "
                  "archived or kept",
                  "raise --shutdown-timeout, check the guest handles the ACPI power button, "
                  "or accept --on-unclean crash-consistent")


def _warnings(label: str, verdicts: list[verify.Verdict],
              archives: list[ArchiveResult]) -> list[str]:
    warnings = []
    if label != Label.CLEAN:
        warnings.append(f"archived the {label} images: the clone did not shut down cleanly")
    warnings += [f"{v.disk}{('/' + v.partition) if v.partition else ''}: {v.detail}"
                 for v in verdicts if v.state is FsState.NEEDS_RECOVERY]
    warnings += [f"{a.target}: {w}" for a in archives for w in a.warnings]
    return warnings


def _make_workdir(base: Path, parent: Parent) -> Path:
    """A private (0700) directory for this run: it will hold the guest's RAM."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"run-{safe_name(parent.name)[:40]}-", dir=base))
    except OSError as exc:
        raise HostError(f"cannot create a work directory in {base}: {exc.strerror}",
                        "pass a writable --workdir with room for the VM's RAM") from None
