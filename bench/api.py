"""The one place the benchmarks call kvmsnap's pipeline.

kvmsnap's pipeline API is young and moves; everything the benchmarks need from one fork is
copied into a :class:`Outcome` here, so only this module follows the moves. It drives
``pipeline.backup`` (a ``BackupJob`` with no archive targets: fork, clone, power button,
expose, verify, commit back) and, for trees that predate it, ``pipeline.fork_vm``.

``after_shutdown`` runs while the clone's disks are exposed and before the parent's
overlays are committed back (the place where archivers work), through a plugin
implementing ``kvmsnap_post_shutdown``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsnap_plugin import pipeline

AfterShutdown = Callable[[], None]


@dataclass(frozen=True)
class CommitFigures:
    device: str
    seconds: float
    bytes: int


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

    def figures(self) -> dict[str, Any]:
        return {"fork_method": self.method, "label": self.label, "clean": self.clean,
                "pause_ms": self.pause_ms, "qemu_downtime_ms": self.qemu_downtime_ms,
                "disk_snapshot_ms": self.disk_snapshot_ms, "ram_bytes": self.ram_bytes,
                "ram_save_s": self.ram_save_s, "clone_restore_s": self.clone_restore_s,
                "shutdown_s": self.shutdown_s, "total_s": self.total_s,
                "commits": [{"device": c.device, "seconds": c.seconds, "bytes": c.bytes}
                            for c in self.commits]}


def fork_once(qmp: Path, method: str, workdir: Path,
              after_shutdown: AfterShutdown | None = None) -> Outcome:
    """Fork the VM behind ``qmp`` once, completely, and return kvmsnap's figures."""
    if hasattr(pipeline, "backup"):
        report = _with_backup(qmp, method, workdir, after_shutdown)
    else:  # the first pipeline (fork_vm), kept working for older trees
        report = pipeline.fork_vm(qmp, pipeline.ForkOptions(method=method, workdir=workdir),
                                  on_exposed=(lambda *_: after_shutdown())
                                  if after_shutdown else None)
    return Outcome(report.method, report.label, report.clean, report.pause_ms,
                   report.qemu_downtime_ms, report.disk_snapshot_ms, report.ram_bytes,
                   report.ram_save_s, report.clone_restore_s, report.shutdown.seconds,
                   report.total_s, tuple(CommitFigures(c.device, c.seconds, c.bytes)
                                         for c in report.commits))


def _with_backup(qmp: Path, method: str, workdir: Path,
                 after_shutdown: AfterShutdown | None) -> Any:
    from kvmsnap_plugin.config import BackupJob, ForkOptions
    from kvmsnap_plugin.hookspecs import hookimpl
    from kvmsnap_plugin.plugins import Hooks, plugin_manager

    class BenchPlugin:
        @hookimpl
        def kvmsnap_post_shutdown(self) -> None:
            if after_shutdown:
                after_shutdown()

    hooks = Hooks(plugin_manager([BenchPlugin()], entry_points=False))
    job = BackupJob(name="bench", qmp=qmp, fork=ForkOptions(method=method, workdir=workdir))
    return pipeline.backup(job, hooks)
