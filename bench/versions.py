"""P1 and P3 on each QEMU build side by side (``--qemu 7.2,10.0``): a table and a plot.

The forks of the builds are interleaved repetition by repetition (bench/fork_bench.py), so
the ratios pair each fork with the same repetition's fork on the other build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt_summary
from bench.fork_bench import qemu_of
from bench.report import COLOUR, SHORT, VARIANTS, ram_label
from bench.report import _plain_log_y as plain_log_y
from bench.report import _x as ratio_text

STYLES = ("o-", "s--", "^:")
PLOT = "qemu_versions.png"


def per_build(forks: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title suffix, a forks view with one build's "summary" and "records") per build.
    Results from before the version matrix: one view, the whole forks, no suffix."""
    summary = forks["summary"]
    builds = summary.get("qemu") or []
    if not builds or builds == ["system"]:
        return [("", forks)]
    versions = forks.get("qemu") or {}
    return [(f" (QEMU {versions.get(build, build)})",
             {"summary": summary["by_qemu"][build],
              "records": [r for r in forks["records"] if qemu_of(r) == build]})
            for build in builds]


def _row(summary: dict[str, Any], ram: int, variant: str) -> dict[str, Any] | None:
    return next((r for r in summary["rows"] if r["ram_mib"] == ram and r["variant"] == variant),
                None)


def _cell(row: dict[str, Any] | None, key: str, digits: int = 1) -> str:
    return fmt_summary(row[key], digits) if row else "-"


def markdown(forks: dict[str, Any]) -> list[str]:
    summary = forks["summary"]
    builds = summary["qemu"]
    first, others = builds[0], builds[1:]
    shown = forks.get("qemu") or {}
    heads = " | ".join(f"{what} {b}" for what in ("STOP->RESUME", "excess", "restore s")
                       for b in builds)
    ratio_heads = " | ".join(f"{b}/{first} {what}" for b in others
                             for what in ("STOP->RESUME", "excess", "restore"))
    columns = 3 * len(builds) + 3 * len(others)
    out = ["## P1 and P3 on each QEMU, side by side", "",
           "Builds: " + ", ".join(f"{b} = QEMU {shown.get(b, b)}" for b in builds) + ". One "
           "demo guest per build and RAM size, up at the same time; each repetition forks one "
           "build's guest (all variants) and then the other's, the order alternating. "
           "*STOP->RESUME*: kvmsnap's `pause_ms` (ms); *excess*: the ticker gap minus the tick "
           "interval, the pause as the guest sees it (ms); *restore*: the clone loading the "
           "RAM image (s). Ratios are paired per repetition, then their median.", "",
           f"| guest RAM | variant | {heads} | {ratio_heads} | pairs |",
           "|---|---|" + "---:|" * (columns + 1)]
    for ram in sorted({r["ram_mib"] for b in builds for r in summary["by_qemu"][b]["rows"]}):
        for variant in VARIANTS:
            rows = [_row(summary["by_qemu"][b], ram, variant) for b in builds]
            if not any(rows):
                continue
            cells = [_cell(r, key, digits) for key, digits in (
                ("pause_ms", 1), ("tick_excess_ms", 1), ("clone_restore_s", 2)) for r in rows]
            paired = [next((e for e in summary["versions"] if e["ram_mib"] == ram
                            and e["variant"] == variant and e["ratio"] == f"{b}/{first}"),
                           None) for b in others]
            ratios = [ratio_text(e[key] if e else {}, 2) for e in paired
                      for key in ("pause_ms", "tick_excess_ms", "clone_restore_s")]
            pairs = ", ".join(str(e["pairs"]) if e else "0" for e in paired)
            out.append(f"| {ram_label(ram)} | {SHORT[variant]} | {' | '.join(cells)} | "
                       f"{' | '.join(ratios)} | {pairs} |")
    return [*out, ""]


def plot(plt, forks: dict[str, Any], out: Path, machine: str) -> list[str]:
    """STOP->RESUME, the guest's excess and the clone's restore against guest RAM, one line
    style per build, one colour per variant."""
    summary = forks["summary"]
    builds = summary.get("qemu") or []
    if len(builds) < 2:
        return []
    shown = forks.get("qemu") or {}
    panels = (("pause_ms", "STOP->RESUME ms"), ("tick_excess_ms", "ticker excess ms"),
              ("clone_restore_s", "clone restore s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.8))
    for ax, (key, what) in zip(axes, panels, strict=True):
        for build, style in zip(builds, STYLES, strict=False):
            rows = summary["by_qemu"][build]["rows"]
            for variant in VARIANTS:
                picked = [r for r in rows if r["variant"] == variant and r[key]["n"]]
                if picked:
                    ax.errorbar([r["ram_mib"] for r in picked],
                                [r[key]["median"] for r in picked],
                                yerr=[[r[key]["median"] - r[key]["min"] for r in picked],
                                      [r[key]["max"] - r[key]["median"] for r in picked]],
                                fmt=style, color=COLOUR[variant], capsize=3,
                                label=f"QEMU {shown.get(build, build)}: {SHORT[variant]}")
        sizes = sorted({r["ram_mib"] for b in builds for r in summary["by_qemu"][b]["rows"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([ram_label(s) for s in sizes])
        ax.set_xlabel("guest RAM (70% filled)")
        ax.set_yscale("log")
        plain_log_y(ax)
        ax.set_ylabel(f"{what} (median; bars: min-max)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"P1 and P3 on each QEMU build ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=110)
    plt.close(fig)
    return [PLOT]
