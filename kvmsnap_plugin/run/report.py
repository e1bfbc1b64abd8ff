"""What a backup of one VM produced: the report printed (or emitted as JSON) at the end."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kvmsnap_plugin.model import ArchiveResult, Collapse, Commit, Label, ShutdownResult, Verdict


@dataclass(frozen=True)
class BackupReport:
    vm: str
    label: str  # "clean", or "crash-consistent" for a labelled fallback
    method: str
    pause_ms: float
    disk_snapshot_ms: float
    ram_bytes: int
    ram_save_s: float
    qemu_downtime_ms: int | None
    clone_restore_s: float
    shutdown: ShutdownResult
    verdicts: list[Verdict]
    archives: list[ArchiveResult]
    kept: list[str]
    commits: list[Commit]
    total_s: float
    warnings: list[str] = field(default_factory=list)
    huge_pages: Collapse | None = None  # with collapse_huge_pages: what re-collapsing did

    @property
    def clean(self) -> bool:
        return self.label == Label.CLEAN and all(v.clean for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data

    def render(self) -> str:
        lines = [f"{self.vm}: {self.label} ({self.method}); parent paused "
                 f"{self.pause_ms:.1f} ms; clone restored in {self.clone_restore_s:.1f} s, "
                 f"shut down in {self.shutdown.seconds:.1f} s ({self.shutdown.reason}); "
                 f"{self.total_s:.1f} s in all"]
        if self.huge_pages:
            hp = self.huge_pages
            lines.append(f"  huge pages {100 * hp.share_before:.0f}% -> "
                         f"{100 * hp.share_after:.0f}% of guest RAM before the pause "
                         f"({hp.seconds:.2f} s)")
        for v in self.verdicts:
            where = v.disk + (f"/{v.partition}" if v.partition else "")
            lines.append(f"  verdict  {where:18} {v.fstype:6} {v.state.value:15} {v.detail}")
        for a in self.archives:
            stored = f", {a.stored_bytes / 2**20:.1f} MiB new" if a.stored_bytes is not None else ""
            lines.append(f"  archive  {a.target:18} {a.kind:6} {a.name}  "
                         f"({a.bytes / 2**20:.1f} MiB read{stored}, {a.seconds:.1f} s)")
        lines += [f"  kept     {path}" for path in self.kept]
        lines += [f"  warning  {w}" for w in self.warnings]
        return "\n".join(lines)
