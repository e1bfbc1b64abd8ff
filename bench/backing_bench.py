"""P6: the parent's pause with its RAM in transparent huge pages against hugetlbfs pages.

Inside the pause, QEMU's background snapshot reads one byte of every page of guest RAM
before it write-protects it (``ram_write_tracking_prepare()`` -> ``populate_read_range()``,
which steps by the RAM block's page size): 4 KiB pages for ordinary anonymous RAM, even
when the kernel backs it with 2 MiB transparent huge pages (THP), but 2 MiB pages for RAM
in hugetlbfs pages (``memory-backend-memfd,hugetlb=on`` or ``memory-backend-file`` on
hugetlbfs; libvirt's ``<memoryBacking><hugepages/>``). P1 found that setup step to be most
of the pause at 1-2 GiB; this measures what a user can change about it without kernel or
QEMU changes.

Per QEMU build and RAM size, two demo guests boot side by side with the same fill and
ticker as P1's, one per backing (``thp``: P1's guest; ``hugetlb``: its RAM in preallocated
2 MiB hugetlbfs pages, the host's pool grown for it and its clone, and set back
afterwards). Each repetition forks both with kvmsnap's defaults (background-snapshot,
``collapse_huge_pages`` on), which one goes first alternating; a discarded warm-up fork of
each comes first. Every fork records P1's figures (:func:`bench.fork_bench._one_fork`).
After the snapshot, a guest write to a page not yet saved makes QEMU copy that page first:
2 MiB at a time on hugetlbfs, so the largest tick gaps while RAM is saved and over the
whole backup are in the table too.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from typing import Any

from bench import fork_bench
from bench.common import Settings, fmt_summary, progress, summary
from bench.report import _x as ratio_text
from bench.report import ram_label
from kvmsnap_demo import hugetlb
from kvmsnap_demo.builder import DemoGuest
from kvmsnap_demo.qemu_builds import QemuBuild, qemu_build

BACKINGS = ("thp", "hugetlb")
FIGURES = ("pause_ms", "phase_migration_setup_ms", "phase_to_resume_ms", "tick_excess_ms",
           "resume_to_tick_ms", "fork_max_gap_ms", "during_save_max_gap_ms", "ram_save_s",
           "clone_restore_s")


def backing_args(backing: str, ram: int) -> tuple[str, ...]:
    """QEMU arguments that put the guest RAM in ``backing`` (``thp``: QEMU's default)."""
    if backing == "thp":
        return ()
    return ("-object", f"memory-backend-memfd,id=ram0,size={ram}M,hugetlb=on,"
                       "hugetlbsize=2M,prealloc=on", "-machine", "memory-backend=ram0")


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    builds = [qemu_build(name) for name in settings.qemu]  # fails now if one is missing
    records: list[dict[str, Any]] = []
    for ram in settings.ram_mib:
        for build in builds:
            try:
                with hugetlb.held_pool() as grow:
                    grow(ram)  # 2 MiB pages: the hugetlb parent's RAM, then its clone's
                    records += _one_size(settings, guest, accel, ram, build)
            except Exception as exc:  # keep the other sizes' and builds' results
                progress(f"P6 at {ram} MiB on QEMU {build.version} failed: {exc}")
                records.append({"ram_mib": ram, "qemu": build.name, "backing": "-",
                                "rep": -1, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc(limit=-6)})
    return {"records": records, "qemu": {build.name: build.version for build in builds}}


def fork_order(reps: int, warmup: bool) -> list[tuple[int, str]]:
    """(rep, backing): a warm-up of each, then both per repetition, alternating the first."""
    order = [(-1, backing) for backing in BACKINGS] if warmup else []
    for rep in range(reps):
        order += [(rep, b) for b in (BACKINGS if rep % 2 == 0 else BACKINGS[::-1])]
    return order


def _one_size(settings: Settings, guest: DemoGuest, accel: str, ram: int,
              build: QemuBuild) -> list[dict[str, Any]]:
    records = []
    with contextlib.ExitStack() as stack:
        guests = {backing: fork_bench._boot(stack, settings, guest, accel, ram, build,
                                            backing_args(backing, ram), name=f"P6 {backing}")
                  for backing in BACKINGS}
        for rep, backing in fork_order(settings.reps, settings.warmup):
            on = guests[backing]
            time.sleep(settings.settle_s)
            record: dict[str, Any] = {"ram_mib": ram, "fill_mib": on.boot["fill_mib"],
                                      "qemu": build.name, "qemu_version": build.version,
                                      "rep": rep, "warmup": rep < 0, "backing": backing}
            record.update(fork_bench._one_fork(settings, on.vm, on.ticker,
                                               on.tmp / f"fork{on.forks}", fork_bench.BG,
                                               True, keep_timeline=False))
            on.forks += 1
            records.append(record)
            progress(f"  P6 {ram:5d} MiB QEMU {build.name:4s} {backing:7s} rep {rep:2d}: "
                     + (f"FAILED {record['error']}" if "error" in record else
                        f"pause {record['pause_ms']:.1f} ms, setup "
                        f"{record.get('phase_migration_setup_ms') or 0:.1f} ms, tick gap "
                        f"{record.get('tick_gap_ms') or 0:.1f} ms"))
            if not on.vm.running():
                raise RuntimeError(f"the {backing} guest died during the benchmark")
    return records


# -- summaries -------------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in records if not r.get("warmup") and "error" not in r]
    rows = []
    for build in dict.fromkeys(r["qemu"] for r in good):
        for ram in sorted({r["ram_mib"] for r in good if r["qemu"] == build}):
            pair = [r for r in good if r["qemu"] == build and r["ram_mib"] == ram]
            for backing in BACKINGS:
                rs = [r for r in pair if r["backing"] == backing]
                rows.append({"qemu": build, "ram_mib": ram, "backing": backing,
                             "n": len(rs), **{k: summary(r.get(k) for r in rs)
                                              for k in FIGURES}})
            rows.append({"qemu": build, "ram_mib": ram, "backing": "hugetlb / thp",
                         "n": 0, **paired(pair)})
    return {"rows": rows}


def paired(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per repetition hugetlb over thp (the two forks ran back to back), then the median."""
    out: dict[str, Any] = {}
    for key in ("pause_ms", "phase_migration_setup_ms", "tick_excess_ms", "fork_max_gap_ms"):
        ratios = []
        for rep in sorted({r["rep"] for r in records}):
            by = {r["backing"]: r.get(key) for r in records if r["rep"] == rep}
            if by.get("thp") and by.get("hugetlb") is not None:
                ratios.append(by["hugetlb"] / by["thp"])
        out[key] = summary(ratios)
    return out


def markdown(section: dict[str, Any]) -> list[str]:
    rows = section["summary"]["rows"]
    versions = section.get("qemu", {})
    lines = ["## P6: the pause with guest RAM in hugetlbfs pages", "",
             " ".join((__doc__ or "").split("\n\n")[1].split()), "",
             " ".join((__doc__ or "").split("\n\n")[2].split()), "",
             "*STOP->RESUME*, *migration setup*, *rest*, *excess*, *RESUME->tick*: as in P1. "
             "*Worst gap*: the largest tick gap over the whole backup; *while RAM saved*: "
             "the largest gap from RESUME until the RAM state file was written. The "
             "*hugetlb / thp* rows are ratios per repetition (both forks back to back), "
             "then their median. Times in ms, RAM save and restore in s.", "",
             "| QEMU | guest RAM | backing | STOP->RESUME | migration setup | rest | excess | "
             "RESUME->tick | worst gap | while RAM saved | RAM save s | restore s | n |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_table_row(row, versions) for row in rows]
    return [*lines, ""]


def _table_row(row: dict[str, Any], versions: dict[str, str]) -> str:
    head = (f"| {versions.get(row['qemu'], row['qemu'])} | {ram_label(row['ram_mib'])} | "
            f"{row['backing']} | ")
    if row["backing"] == "hugetlb / thp":  # the paired ratios, where there are some
        cells = [ratio_text(row[k], 2) if k in row else "" for k in (
            "pause_ms", "phase_migration_setup_ms", "", "tick_excess_ms", "",
            "fork_max_gap_ms", "", "", "", "")]
        return head + " | ".join(cells) + " |"
    cells = [fmt_summary(row[k]) for k in (
        "pause_ms", "phase_migration_setup_ms", "phase_to_resume_ms", "tick_excess_ms",
        "resume_to_tick_ms", "fork_max_gap_ms", "during_save_max_gap_ms")]
    cells += [fmt_summary(row["ram_save_s"], 2), fmt_summary(row["clone_restore_s"], 2),
              str(row["n"])]
    return head + " | ".join(cells) + " |"
