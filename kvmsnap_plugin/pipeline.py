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
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin import verify
from kvmsnap_plugin.archive import ArchiveResult, archive_all
from kvmsnap_plugin.chain import Commit, commit_back, keep_images
from kvmsnap_plugin.clone import ClonePlan, plan_clone, prepare_overlays, running_clone
from kvmsnap_plugin.config import BackupJob
from kvmsnap_plugin.errors import HostError, SkipBackup, VMError
from kvmsnap_plugin.expose import exposed
from kvmsnap_plugin.fork import parent_overlay_path, take_fork
from kvmsnap_plugin.parent import Parent, discover
from kvmsnap_plugin.paths import safe_name, socket_dir
from kvmsnap_plugin.plugins import Hooks
from kvmsnap_plugin.qmp import QmpSession, peer_pid
from kvmsnap_plugin.report import CLEAN, CRASH_CONSISTENT, BackupReport
from kvmsnap_plugin.shutdown import ShutdownPolicy, ShutdownResult, shut_down

log = logging.getLogger("kvmsnap")


@dataclass(frozen=True)
class Plan:
    """What a backup would do (``--dry-run``): nothing is touched to make it."""

    vm: str
    pid: int
    disks: list[dict[str, str]]
    clone_argv: list[str]
    targets: list[str]
    mount_root: str

    def render(self) -> str:
        lines = [f"{self.vm} (QEMU pid {self.pid}) would be forked:"]
        lines += [f"  disk {d['device']}: {d['image']} frozen; parent writes to {d['overlay']}"
                  for d in self.disks]
        lines.append(f"  clone: {' '.join(self.clone_argv)}")
        lines.append(f"  filesystems mounted under {self.mount_root}")
        lines += [f"  archive into {t}" for t in self.targets] or ["  no archive targets"]
        return "\n".join(lines)


def backup(job: BackupJob, hooks: Hooks | None = None) -> BackupReport:
    """Back up one VM. Plugins' cleanup hooks run whatever happens."""
    hooks = hooks or Hooks()
    report, error = None, None
    try:
        report = _backup(job, hooks)
        return report
    except BaseException as exc:
        error = exc
        raise
    finally:
        hooks.cleanup(job, report, error)


def plan(job: BackupJob) -> Plan:
    """Describe what :func:`backup` would do, touching nothing."""
    pid = job.fork.pid or peer_pid(job.qmp)
    with QmpSession(job.qmp, name="parent") as session:
        session.connect()
        parent = discover(session, job.qmp, pid)
    with tempfile.TemporaryDirectory() as tmp:
        clone = plan_clone(parent, Path(tmp), Path(tmp))
    disks = [{"device": d.device, "image": d.filename,
              "overlay": str(parent_overlay_path(d, "RUN", job.fork.overlay_dir))}
             for d in parent.writable_disks]
    return Plan(parent.name, pid, disks, list(clone.argv),
                [f"{t.name} ({t.type}, {t.mode})" for t in job.targets],
                str(mount_root(job)))


def mount_root(job: BackupJob) -> Path:
    """Stable per VM: restic records absolute paths, and borgmatic names a fixed path."""
    return job.fork.mount_root or job.fork.workdir / "mnt" / safe_name(job.name)


def _backup(job: BackupJob, hooks: Hooks) -> BackupReport:
    started = time.monotonic()
    pid = job.fork.pid or peer_pid(job.qmp)
    options = job.fork
    commits: list[Commit] = []
    with contextlib.ExitStack() as cleanup:
        session = cleanup.enter_context(QmpSession(job.qmp, name="parent"))
        session.connect()
        parent = discover(session, job.qmp, pid)
        reason = hooks.pre_backup(job, parent)
        if reason:
            raise SkipBackup(f"{job.name}: skipped by a plugin: {reason}")
        workdir = _make_workdir(options.workdir, parent)
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        sockets = cleanup.enter_context(socket_dir())
        clone_plan = plan_clone(parent, workdir, sockets, options.clone_console)
        prepare_overlays(clone_plan, parent.writable_disks)
        point = take_fork(session, parent, workdir / "ram.state",
                          run_id=f"{os.getpid()}-{int(time.time())}",
                          method=options.method, overlay_dir=options.overlay_dir)
        cleanup.callback(lambda: commits.extend(commit_back(session, point.disks)))
        hooks.snapshot(job, point)
        stopped, restore_s = _run_clone(clone_plan, point.state_file, options.shutdown)
        label = _label(stopped, options.shutdown)
        images = _images(clone_plan, label)
        with exposed(images, workdir, mount_root(job)) as exposure:
            hooks.post_shutdown(job, point, exposure, label)
            archives: list[ArchiveResult] = archive_all(hooks, job, exposure, label)
            verdicts = verify.verdicts(exposure.filesystems)
        kept = ([str(p) for p in keep_images(images, options.keep_dir)]
                if options.keep_dir else [])
    report = BackupReport(parent.name, label, point.method, point.pause_ms,
                          point.disk_snapshot_ms, point.ram_bytes, point.ram_save_s,
                          point.qemu_downtime_ms, restore_s, stopped, verdicts, archives, kept,
                          commits, time.monotonic() - started, _warnings(label, verdicts,
                                                                         archives))
    log.info("%s: done in %.1f s", job.name, report.total_s)
    return report


def _run_clone(clone_plan: ClonePlan, state_file: Path,
               policy: ShutdownPolicy) -> tuple[ShutdownResult, float]:
    with running_clone(clone_plan, state_file) as clone:
        return shut_down(clone, policy), clone.restore_s


def _images(clone_plan: ClonePlan, label: str) -> list[tuple[str, Path]]:
    """The clone's disks, or the frozen (crash-consistent) images for a labelled fallback."""
    if label == CLEAN:
        return [(d.device, d.overlay) for d in clone_plan.disks]
    return [(d.device, d.frozen) for d in clone_plan.disks]


def _label(stopped: ShutdownResult, policy: ShutdownPolicy) -> str:
    if stopped.clean:
        return CLEAN
    if policy.on_unclean == "crash-consistent":
        log.warning("the clone did not shut down cleanly (%s): using the crash-consistent "
                    "images of the fork instant, labelled as such", stopped.reason)
        return CRASH_CONSISTENT
    raise VMError(f"the clone did not shut down cleanly ({stopped.reason}); nothing was "
                  "archived or kept",
                  "raise --shutdown-timeout, check the guest handles the ACPI power button, "
                  "or accept --on-unclean crash-consistent")


def _warnings(label: str, verdicts: list[verify.Verdict],
              archives: list[ArchiveResult]) -> list[str]:
    warnings = []
    if label != CLEAN:
        warnings.append(f"archived the {label} images: the clone did not shut down cleanly")
    warnings += [f"{v.disk}{('/' + v.partition) if v.partition else ''}: {v.detail}"
                 for v in verdicts if v.state is verify.State.NEEDS_RECOVERY]
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
