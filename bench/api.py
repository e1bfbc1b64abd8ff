"""The one place the benchmarks call kvmsnap's pipeline.

Everything the benchmarks need from one backup is copied into an :class:`Outcome` here, so
only this module follows changes of kvmsnap's API. It drives ``pipeline.backup`` (a
``BackupJob``: fork, clone, power button, expose, archive into the job's targets if any,
verify, commit back).

A bench plugin rides along on kvmsnap's hooks: it runs the caller's callbacks at the fork
point (``on_snapshot``, in ``kvmsnap_snapshot``: the parent runs again, the clone has not
started) and while the clone's disks are exposed (``after_shutdown``, in
``kvmsnap_post_shutdown``: before the archivers and before the parent's overlays are
committed back), and notes the monotonic time of every hook, so that a backup's wall time
can be split into phases (:func:`phases`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmsnap_plugin.model import (
    ArchiveTarget,
    BackupJob,
    BackupReport,
    Collapse,
    Exposure,
    ForkOptions,
)
from kvmsnap_plugin.plugin.hookspecs import hookimpl
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run import pipeline

Callback = Callable[[], None]
#: called with the raw read-only views of the clone's disks (FUSE exports) while exposed
OnExposed = Callable[[list[Path]], None]


@dataclass(frozen=True)
class CommitFigures:
    device: str
    seconds: float
    bytes: int


@dataclass(frozen=True)
class ArchiveFigures:
    target: str
    type: str
    kind: str  # "files" or "image"
    source: str  # a mount tree, a disk, or a small file beside the disks (VM record)
    bytes: int  # read from the clone's disks
    stored_bytes: int | None  # new in the repository
    seconds: float


@dataclass(frozen=True)
class TargetSpec:
    """One archive target: ``tool`` "borg" or "restic", ``mode`` "files" or "image"."""

    name: str
    tool: str
    mode: str
    repository: Path


@dataclass(frozen=True)
class Outcome:
    method: str
    label: str
    clean: bool
    pause_ms: float
    qemu_downtime_ms: int | None
    disk_snapshot_ms: float
    ram_bytes: int
    ram_save_s: float
    clone_restore_s: float
    shutdown_s: float
    total_s: float
    commits: tuple[CommitFigures, ...]
    archives: tuple[ArchiveFigures, ...] = ()
    wall_s: float = 0.0  # from the call into kvmsnap to its return
    marks: dict[str, float] = field(default_factory=dict)  # hook -> seconds since the call
    huge_pages: dict[str, Any] | None = None  # what re-collapsing the huge pages did
    #: ... and what re-collapsing them after the RAM snapshot did (for the next backup)
    huge_pages_after: dict[str, Any] | None = None

    def figures(self) -> dict[str, Any]:
        return {"fork_method": self.method, "label": self.label, "clean": self.clean,
                "pause_ms": self.pause_ms, "qemu_downtime_ms": self.qemu_downtime_ms,
                "disk_snapshot_ms": self.disk_snapshot_ms, "ram_bytes": self.ram_bytes,
                "ram_save_s": self.ram_save_s, "clone_restore_s": self.clone_restore_s,
                "shutdown_s": self.shutdown_s, "total_s": self.total_s,
                "commits": [{"device": c.device, "seconds": c.seconds, "bytes": c.bytes}
                            for c in self.commits], "huge_pages": self.huge_pages,
                "huge_pages_after": self.huge_pages_after}

    def archive_figures(self) -> list[dict[str, Any]]:
        return [{"target": a.target, "type": a.type, "kind": a.kind, "source": a.source,
                 "bytes": a.bytes,
                 "stored_bytes": a.stored_bytes, "seconds": a.seconds} for a in self.archives]


def backup_once(qmp: Path, workdir: Path, *, method: str = "background-snapshot",
                targets: Sequence[TargetSpec] = (), mount_root: Path | None = None,
                after_shutdown: Callback | None = None,
                on_snapshot: Callback | None = None,
                on_exposed: OnExposed | None = None,
                collapse_huge_pages: bool = ForkOptions.collapse_huge_pages) -> Outcome:
    """One ``pipeline.backup`` of the VM behind ``qmp`` into ``targets`` (none: fork,
    clone, shut down, expose, verify and commit back only). ``on_exposed`` runs right after
    ``after_shutdown``, with the raw views of the clone's disks. ``collapse_huge_pages``:
    kvmsnap's option (on by default)."""
    marks: dict[str, float] = {}
    started = time.monotonic()

    def mark(name: str) -> None:
        marks[name] = time.monotonic() - started

    class BenchPlugin:
        # trylast: after the archivers' own checks (borg info, restic cat config)
        @hookimpl(trylast=True)
        def kvmsnap_pre_backup(self) -> None:
            mark("pre_backup")

        @hookimpl(tryfirst=True)
        def kvmsnap_snapshot(self) -> None:
            mark("snapshot")
            if on_snapshot:
                on_snapshot()
            mark("snapshot_done")

        @hookimpl(tryfirst=True)
        def kvmsnap_post_shutdown(self, exposure: Exposure) -> None:
            mark("exposed")
            if after_shutdown:
                after_shutdown()
            if on_exposed:
                on_exposed([d.image for d in exposure.disks])
            mark("post_shutdown_done")

        @hookimpl
        def kvmsnap_cleanup(self) -> None:
            mark("cleanup")

    hooks = Hooks(plugin_manager([BenchPlugin()], entry_points=False))
    job = BackupJob(name="bench", qmp=qmp,
                    fork=ForkOptions(method=method, workdir=workdir, mount_root=mount_root,
                                     collapse_huge_pages=collapse_huge_pages),
                    targets=tuple(ArchiveTarget(t.name, t.tool, t.mode,
                                                {"repository": str(t.repository)})
                                  for t in targets))
    report = pipeline.backup(job, hooks)
    return _outcome(report, time.monotonic() - started, marks)


def _outcome(report: BackupReport, wall_s: float, marks: dict[str, float]) -> Outcome:
    return Outcome(report.method, report.label, report.clean, report.pause_ms,
                   report.qemu_downtime_ms, report.disk_snapshot_ms, report.ram_bytes,
                   report.ram_save_s, report.clone_restore_s, report.shutdown.seconds,
                   report.total_s, tuple(CommitFigures(c.device, c.seconds, c.bytes)
                                         for c in report.commits),
                   tuple(ArchiveFigures(a.target, a.type, a.kind, str(a.source), a.bytes,
                                        a.stored_bytes, a.seconds)
                         for a in report.archives),
                   wall_s, dict(marks),
                   _collapse(report.huge_pages), _collapse(report.huge_pages_after))


def _collapse(collapse: Collapse | None) -> dict[str, Any] | None:
    return asdict(collapse) if collapse else None


#: the phases of one backup, in order
PHASES = ("preflight", "fork", "guest_writes", "clone_restore", "clone_shutdown", "expose",
          "archive", "commit", "other")


def phases(outcome: Outcome) -> dict[str, float] | None:
    """The backup's wall time split into :data:`PHASES` (seconds), from the hook marks and
    kvmsnap's own figures:

    - preflight: the call until the last ``kvmsnap_pre_backup`` (journal lock, describing
      the VM, the archivers' repository checks);
    - fork: until ``kvmsnap_snapshot`` (clone plan and overlays, the pause, the RAM save);
    - guest_writes: inside ``kvmsnap_snapshot`` (the caller's ``on_snapshot``);
    - clone_restore: ``clone_restore_s``; clone_shutdown: ``shutdown.seconds``;
    - expose: the rest up to ``kvmsnap_post_shutdown`` (clone QEMU start and exit, FUSE
      export, loop devices, mounts);
    - archive: the archivers' own seconds; commit: the commits' seconds;
    - other: what is left (verify, unmount, stopping exports, journal, removing the work
      directory, the caller's ``after_shutdown``).
    """
    m = outcome.marks
    if not {"pre_backup", "snapshot", "snapshot_done", "exposed"} <= m.keys():
        return None
    out = {"preflight": m["pre_backup"],
           "fork": m["snapshot"] - m["pre_backup"],
           "guest_writes": m["snapshot_done"] - m["snapshot"],
           "clone_restore": outcome.clone_restore_s,
           "clone_shutdown": outcome.shutdown_s,
           "expose": (m["exposed"] - m["snapshot_done"] - outcome.clone_restore_s
                      - outcome.shutdown_s),
           "archive": sum(a.seconds for a in outcome.archives),
           "commit": sum(c.seconds for c in outcome.commits)}
    out["other"] = outcome.wall_s - sum(out.values())
    return out
