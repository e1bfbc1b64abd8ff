"""How a run's results read to a person: the report of a backup, and a dry run's plan.

The records themselves (:class:`~kvmsnap_plugin.model.BackupReport`,
:class:`~kvmsnap_plugin.model.Plan`) live in the model and give their JSON form with
``as_dict()``; this module renders them as the lines ``kvmsnap`` prints.
"""

from __future__ import annotations

from kvmsnap_plugin.disks import classify
from kvmsnap_plugin.model import (
    ArchiveResult,
    BackupReport,
    Collapse,
    FsState,
    Label,
    PartitionRecord,
    Plan,
    Verdict,
)

MIB = 2**20


def render_report(report: BackupReport) -> str:
    """One summary line, then one line per verdict, archive, kept image and warning."""
    lines = [f"{report.vm}: {report.label} ({report.method}); parent paused "
             f"{report.pause_ms:.1f} ms; clone restored in {report.clone_restore_s:.1f} s, "
             f"shut down in {report.shutdown.seconds:.1f} s ({report.shutdown.reason}); "
             f"{report.total_s:.1f} s in all"]
    if report.clone_binary:
        lines.append(f"  clone binary: {report.clone_binary.describe()}")
    passes = {"before the pause": report.huge_pages,
              "after the RAM snapshot": report.huge_pages_after}
    lines += [_huge_pages(collapse, when) for when, collapse in passes.items() if collapse]
    lines += [_partition(p) for p in report.partitions]
    lines += [_verdict(v) for v in report.verdicts]
    lines += [_archive(a) for a in report.archives]
    lines += [f"  netfs    {m.mountpoint:18} {m.fstype:6} {m.source}: {m.outcome}"
              for m in report.shutdown.network_mounts]
    lines += [f"  FAILED   {f.target:18} {f.type:6} {f.error} (fix: {f.fix})"
              for f in report.failed_targets]
    lines += [f"  kept     {path}" for path in report.kept]
    lines += [f"  warning  {w}" for w in report.warnings]
    return "\n".join(lines)


def warnings_of(label: Label, verdicts: list[Verdict], archives: list[ArchiveResult],
                partitions: list[PartitionRecord]) -> list[str]:
    """The run's warnings, one per item; any of them makes the exit code 1:

    - 0: the clone shut down, every partition that holds files was archived and verdicted
      clean, everything else skipped by rule (holds no files) or by ``skip_partitions``;
    - 1: a named warning per item archived but not proven clean (crash-consistent images,
      a journal to replay, no clean-shutdown check) or NOT archived (and why);
    - 2: refusals and errors (raised, never a warning).
    """
    warnings = []
    if label is not Label.CLEAN:
        warnings.append(f"archived the {label} images: the clone did not shut down cleanly")
    warnings += [f"{v.where}: {v.detail}" for v in verdicts
                 if v.state is FsState.NEEDS_RECOVERY]
    warnings += classify.warnings(partitions, verdicts)
    warnings += [f"{a.target}: {w}" for a in archives for w in a.warnings]
    return warnings


def render_plan(plan: Plan) -> str:
    """What ``--dry-run`` prints: the disks to freeze, the clone, the mounts, the targets."""
    lines = [f"{plan.vm} (QEMU pid {plan.pid}) would be forked:"]
    lines += [f"  disk {d['device']}: {d['image']} frozen; parent writes to {d['overlay']}"
              for d in plan.disks]
    lines.append(f"  clone: {' '.join(plan.clone_argv)}")
    if plan.clone_binary:
        lines.append(f"  clone binary: {plan.clone_binary}")
    lines.append(f"  filesystems mounted under {plan.mount_root}")
    lines += [f"  archive into {t}" for t in plan.targets] or ["  no archive targets"]
    return "\n".join(lines)


def _huge_pages(collapse: Collapse, when: str) -> str:
    return (f"  huge pages {100 * collapse.share_before:.0f}% -> "
            f"{100 * collapse.share_after:.0f}% of guest RAM {when} "
            f"({collapse.collapsed_mib} MiB re-collapsed in {collapse.seconds:.2f} s, RSS "
            f"{collapse.rss_growth_kib >> 10:+d} MiB"
            + (f", {collapse.unfinished_mib} MiB left: time budget" if collapse.unfinished_mib
               else "") + ")")


def _partition(part: PartitionRecord) -> str:
    label = f" [{part.label}]" if part.label else ""
    return (f"  part     {part.where:18} {part.fstype or part.kind:11} {part.outcome:17} "
            f"{part.reason}{label}")


def _verdict(verdict: Verdict) -> str:
    return (f"  verdict  {verdict.where:18} {verdict.fstype:6} {verdict.state.value:15} "
            f"{verdict.detail}")


def _archive(archive: ArchiveResult) -> str:
    stored = (f", {archive.stored_bytes / MIB:.1f} MiB new"
              if archive.stored_bytes is not None else "")
    return (f"  archive  {archive.target:18} {archive.kind:6} {archive.name}  "
            f"({archive.bytes / MIB:.1f} MiB read{stored}, {archive.seconds:.1f} s)")
