"""RESULTS.md (tables the README can quote) and the PNG plots, from the results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, fmt_summary, machine_line

P1_TARGET_MS = 20.0
P3_TARGET_RATIO = 1.1
#: "flat": the largest RAM size's median within this factor (plus 1 ms) of the smallest's
FLAT_FACTOR = 1.25
VARIANTS = ("bg-intact", "bg-split", "sc")
LABEL = {"bg-intact": "background-snapshot, huge pages intact",
         "bg-split": "background-snapshot, huge pages split (back-to-back)",
         "sc": "stop-and-copy"}
SHORT = {"bg-intact": "bg, THP intact", "bg-split": "bg, THP split", "sc": "stop-and-copy"}
COLOUR = {"bg-intact": "tab:blue", "bg-split": "tab:purple", "sc": "tab:red"}
BACKGROUND = ("bg-intact", "bg-split")


def ram_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


# -- Markdown ------------------------------------------------------------------------------------
def markdown(results: dict[str, Any], plots: list[str]) -> str:
    settings = results["settings"]
    lines = ["# kvmsnap benchmarks", "",
             f"Measured {results['machine']['date']} on: {machine_line(results['machine'])}.",
             "",
             f"Run: {'quick smoke run' if settings['quick'] else 'full run'}, "
             f"{settings['reps']} repetition(s) per variant and size, kvmsnap "
             f"{results['machine']['kvmsnap_commit']}, {results['duration_s'] / 60:.1f} min. "
             f"Host load while measuring: {_load_text(results)}.", "",
             "Figures are medians over the repetitions with [min-max] in brackets. Ratios are "
             "taken per repetition between variants run back to back on the same VM "
             "(alternating which goes first), then their median. Raw samples: "
             "`results.json`.", ""]
    chosen = results["benchmarks"]
    forks = results.get("forks")
    if "P1" in chosen and forks and "summary" in forks:
        lines += _p1(forks, settings)
    if "P3" in chosen and forks and "summary" in forks:
        lines += _p3(forks)
    if "P4" in chosen and "P4" in results and "summary" in results["P4"]:
        lines += _p4(results["P4"])
    failed = [r for key in ("forks", "P4") if key in results
              for r in results[key]["records"] if "error" in r]
    if failed:
        lines += ["## Failed samples", ""]
        lines += [f"- {r.get('ram_mib', '')} {r.get('variant', r.get('write_mib', ''))} "
                  f"rep {r.get('rep')}: {r['error']}" for r in failed] + [""]
    lines += ["## Not measured here", "",
              "- P2 (end-to-end archive overhead against borg/restic of an offline raw copy) "
              "is not part of this suite yet: it needs the `kvmsnap backup` command with "
              "archive targets.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(lines)


def _load_text(results: dict[str, Any]) -> str:
    records = [r for key in ("forks", "P4") if key in results for r in results[key]["records"]]
    loads = [r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None]
    others = [r.get("other_qemu", 0) for r in records]
    if not loads:
        return "not recorded"
    return (f"1-min load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{results['machine']['cores']} cores; up to {max(others)} QEMU processes of other "
            "users running at the same time")


def _p1(p1: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    summary = p1["summary"]
    rows = summary["rows"]
    interval = summary["baseline_interval"]
    out = ["## P1: the parent's pause as the guest sees it", "",
           f"A demo guest with {int(settings['fill_ratio'] * 100)}% of its RAM filled with "
           "random data (in a tmpfs) prints a tick every 10 ms on a serial port; the host "
           "stamps each tick's arrival. Under TCG the guest's clock stops while it is paused, "
           "so a pause of P ms shows as one gap of about (tick interval + P).", "",
           "Three variants per repetition: background-snapshot with the guest RAM's "
           "transparent huge pages (THP) *intact* (re-collapsed with "
           "`process_madvise(MADV_COLLAPSE)` just before: a VM's first backup after boot, or "
           "one whose huge pages khugepaged rebuilt since the last backup); background-"
           "snapshot right after the previous one, the huge pages *split* by its write faults "
           "(back-to-back backups); stop-and-copy.", "",
           "*Gap*: the largest tick gap overlapping the pause (located by the STOP/RESUME "
           "events, QEMU's timestamps). *Excess*: that gap minus the median tick interval, "
           "an estimate of the pause seen from outside. *+-0.5 s*: the largest gap within "
           "half a second either side of the pause. *RESUME->tick*: how long after RESUME "
           "the next tick arrived (at most one tick interval if the guest runs at full speed "
           "again). *STOP->RESUME*: kvmsnap's `pause_ms`. *QEMU downtime*: `query-migrate`'s "
           "figure (for stop-and-copy it leaves out the time the VM was already stopped). "
           "*Worst gap*: the largest gap anywhere during the whole backup (clone, shutdown, "
           "commit included). *THP*: share of the guest RAM in huge pages before the fork. "
           "All times in ms.", "",
           "| guest RAM (filled) | variant | gap | excess | +-0.5 s | RESUME->tick | "
           "STOP->RESUME | QEMU downtime | disk snapshot | worst gap during backup | THP | n |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {ram_label(row['ram_mib'])} ({row['fill_mib']} MiB) | "
                   f"{SHORT[row['variant']]} | "
                   f"{fmt_summary(row['tick_gap_ms'])} | {fmt_summary(row['tick_excess_ms'])} | "
                   f"{fmt_summary(row['window_max_gap_ms'])} | "
                   f"{fmt_summary(row['resume_to_tick_ms'])} | {fmt_summary(row['pause_ms'])} | "
                   f"{fmt_summary(row['qemu_downtime_ms'], 0)} | "
                   f"{fmt_summary(row['disk_snapshot_ms'])} | "
                   f"{fmt_summary(row['fork_max_gap_ms'])} | "
                   f"{_pct(row['huge_share_before'])} | {row['tick_gap_ms']['n']} |")
    out += _phase_table(rows)
    chunk = summary["baseline_chunk_max"]
    base = summary["baseline"]
    out += ["", f"Ticker baseline (the same guests, {settings['baseline_s']:g} s without a fork "
            f"before each fork): median tick interval {fmt_summary(interval)} ms; largest gap "
            f"per 1 s window {fmt_summary(chunk)} ms; per {settings['baseline_s']:g} s window "
            f"{fmt_summary(base)} ms. The *+-0.5 s* column compares with the 1 s figure: a "
            "gap within the baseline's range cannot be told apart from the ticker's own "
            "jitter (a TCG guest on 2 host cores, shared with the clone and other users).", ""]
    during = [r for r in rows if r["variant"] in BACKGROUND
              and r["during_save_median_interval_ms"]["n"]]
    if during:
        out += ["While background-snapshot streams RAM the guest runs, slower: median tick "
                "interval during the save "
                + "; ".join(f"{ram_label(r['ram_mib'])} {SHORT[r['variant']]}: "
                            f"{fmt_summary(r['during_save_median_interval_ms'])} ms (largest "
                            f"gap {fmt_summary(r['during_save_max_gap_ms'])}) over "
                            f"{fmt_summary(r['ram_save_observed_s'], 2)} s" for r in during)
                + f"; against {fmt_summary(interval)} ms without a fork.", ""]
    collapse = summary.get("collapse_s") or {}
    if collapse.get("n"):
        out += [f"Re-collapsing the huge pages took {fmt_summary(collapse, 2)} s per fork"
                + (f" (errors: {', '.join(summary['collapse_errors'])})"
                   if summary.get("collapse_errors") else "") + ".", ""]
    out += ["Ratios, paired per repetition:", "",
            "| guest RAM | ratio | STOP->RESUME | ticker gap | +-0.5 s gap | RAM save time | "
            "clone restore | whole backup | pairs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in summary["ratios"]:
        top, bottom = entry["ratio"].split("/")
        out.append(f"| {ram_label(entry['ram_mib'])} | {SHORT[top]} / {SHORT[bottom]} | "
                   f"{_x(entry['pause_ms'])} | {_x(entry['tick_gap_ms'])} | "
                   f"{_x(entry['window_max_gap_ms'])} | {_x(entry['ram_save_observed_s'], 2)} | "
                   f"{_x(entry['clone_restore_s'], 2)} | {_x(entry['total_s'], 2)} | "
                   f"{entry['pairs']} |")
    out += ["", "Against the target (background-snapshot, P1 <= 20 ms and flat across RAM "
            "sizes):", ""] + [f"- {v}" for v in p1_verdicts(p1)] + [""]
    return out


def _phase_table(rows: list[dict[str, Any]]) -> list[str]:
    if not any(r["phase_migration_setup_ms"]["n"] for r in rows):
        return []
    out = ["", "Where STOP->RESUME goes (medians, ms), from QEMU's MIGRATION events: "
           "*before migrate* is kvmsnap's part after `stop` (the disk snapshot transaction, "
           "QMP round trips); *migration setup* is QEMU's setup phase (status setup -> "
           "active), which runs inside the pause because kvmsnap stops the VM first (so that "
           "disks and RAM are one instant); for background-snapshot it starts with "
           "`ram_write_tracking_prepare()`, which reads one byte of every 4 KiB page of guest "
           "RAM, so it grows with RAM size and with split huge pages; *rest* runs from there "
           "to RESUME "
           "(background-snapshot: device state, write-protecting RAM, restart; "
           "stop-and-copy: the whole RAM copy, then `cont`).", "",
           "| guest RAM | variant | STOP->RESUME | before migrate | migration setup | rest | "
           "QEMU downtime |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {ram_label(row['ram_mib'])} | {SHORT[row['variant']]} | "
                   f"{fmt(row['pause_ms']['median'])} | "
                   f"{fmt(row['phase_before_migrate_ms']['median'])} | "
                   f"{fmt(row['phase_migration_setup_ms']['median'])} | "
                   f"{fmt(row['phase_to_resume_ms']['median'])} | "
                   f"{fmt(row['qemu_downtime_ms']['median'], 0)} |")
    return out


def _x(stats: dict[str, Any], digits: int = 1) -> str:
    text = fmt_summary(stats, digits)
    return text if text == "-" else text.replace(" [", "x [", 1) if " [" in text else text + "x"


def _pct(stats: dict[str, Any]) -> str:
    return "-" if not stats.get("n") else f"{stats['median']:.0%}"


def p1_verdicts(p1: dict[str, Any]) -> list[str]:
    verdicts = []
    for variant in BACKGROUND:
        rows = [r for r in p1["summary"]["rows"] if r["variant"] == variant]
        if not rows:
            continue
        for key, what in (("pause_ms", "STOP->RESUME (QEMU's view)"),
                          ("tick_excess_ms", "ticker excess (the guest's view, tick interval "
                           "removed)"),
                          ("tick_gap_ms", "raw ticker gap (tick interval included)")):
            worst = max((r[key]["median"] for r in rows if r[key]["median"] is not None),
                        default=None)
            high = max((r[key]["max"] for r in rows if r[key]["max"] is not None),
                       default=None)
            if worst is None or high is None:
                continue
            verdicts.append(f"{LABEL[variant]}, {what}: median {worst:.1f} ms at worst "
                            f"(single worst {high:.1f} ms) -> "
                            f"{'met' if worst <= P1_TARGET_MS else 'NOT met'}")
        flat = (p1["summary"]["flatness"].get(variant) or {}).get("pause_ms")
        if flat:
            is_flat = flat["median_largest"] <= FLAT_FACTOR * flat["median_smallest"] + 1.0
            verdicts.append(
                f"{LABEL[variant]}, flatness of STOP->RESUME: {flat['median_smallest']:.1f} ms "
                f"at {flat['smallest_gib']:g} GiB -> {flat['median_largest']:.1f} ms at "
                f"{flat['largest_gib']:g} GiB, slope {flat['slope_ms_per_gib']:+.1f} ms per "
                f"GiB -> {'flat' if is_flat else 'NOT flat'} (criterion: largest <= "
                f"{FLAT_FACTOR:g} x smallest + 1 ms)")
    base = p1["summary"]["baseline_chunk_max"]
    if base.get("median") is not None and base["median"] >= 0.75 * P1_TARGET_MS:
        verdicts.append(f"the ticker alone shows a largest gap of {base['median']:.1f} ms "
                        f"per second (median; up to {base['max']:.1f} ms) without any fork, so "
                        "raw gaps cannot resolve a 20 ms target on this host: judge by the "
                        "excess and by STOP->RESUME")
    return verdicts or ["no background-snapshot samples"]


def _p3(p3: dict[str, Any]) -> list[str]:
    out = ["## P3: the clone's cost", "",
           "*Restore*: `clone_restore_s` (the clone QEMU loading the RAM image). *Peak RSS*: "
           "the clone QEMU's `VmHWM`, polled every 20 ms from /proc while it runs. *RAM "
           "image*: the largest size the state file reached (zero pages are not stored). "
           "*RSS - image*: the clone's own overhead beyond the guest pages it loaded (QEMU "
           "binary and libraries, TCG translation cache, device state). *RAM save*: from "
           "STOP until the state file stopped growing (observed every 20 ms), because "
           "kvmsnap's `ram_save_s` (`query-migrate` total-time) can read 0 for background "
           "snapshots on QEMU 7.2.", "",
           "| guest RAM (filled) | variant | restore s | clone peak RSS MiB | peak RSS / guest "
           "RAM | RAM image MiB | RSS - image MiB | RAM save s | n |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in p3["summary"]["rows"]:
        out.append(f"| {ram_label(row['ram_mib'])} ({row['fill_mib']} MiB) | "
                   f"{SHORT[row['variant']]} | {fmt_summary(row['clone_restore_s'], 2)} | "
                   f"{fmt_summary(row['clone_peak_rss_mib'], 0)} | "
                   f"{fmt_summary(row['clone_rss_ratio'], 2)} | "
                   f"{fmt_summary(row['ram_state_mib'], 0)} | "
                   f"{fmt_summary(row['clone_overhead_mib'], 0)} | "
                   f"{fmt_summary(row['ram_save_observed_s'], 2)} | "
                   f"{row['clone_restore_s']['n']} |")
    out += ["", f"Against the target (clone peak RSS <= {P3_TARGET_RATIO:g}x guest RAM):", ""]
    out += [f"- {v}" for v in p3_verdicts(p3)] + [""]
    return out


def p3_verdicts(p3: dict[str, Any]) -> list[str]:
    verdicts = []
    for ram in sorted({r["ram_mib"] for r in p3["summary"]["rows"]}):
        rows = [r for r in p3["summary"]["rows"] if r["ram_mib"] == ram]
        worst = max((r["clone_rss_ratio"]["max"] for r in rows if r["clone_rss_ratio"]["n"]),
                    default=None)
        if worst is None:
            verdicts.append(f"{ram_label(ram)}: no RSS sample")
            continue
        overhead = max((r["clone_overhead_mib"]["median"] for r in rows
                        if r["clone_overhead_mib"]["n"]), default=None)
        verdicts.append(f"{ram_label(ram)}: {worst:.2f}x at worst over all variants -> "
                        f"{'met' if worst <= P3_TARGET_RATIO else 'NOT met'}"
                        + (f" (clone overhead beyond the loaded guest pages ~{overhead:.0f} MiB)"
                           if overhead is not None else ""))
    return verdicts


def _p4(p4: dict[str, Any]) -> list[str]:
    out = ["## P4: block-commit time against what the parent wrote during the backup", "",
           f"A {p4['vm_ram_mib']} MiB demo guest with an extra, unmounted virtio disk; during "
           f"each backup ({p4['method']}), after the fork and before the commit back, QEMU's "
           "`qemu-io` writes N MiB sequentially through that disk's own BlockBackend, i.e. "
           "into the parent's overlay. *Committed*: the block job's length (`Commit.bytes`). "
           "*Commit s*: `Commit.seconds` (block-commit, pivot, overlay removal).", "",
           "| written MiB | committed MiB | commit s | MiB/s | n |",
           "|---:|---:|---:|---:|---:|"]
    for row in p4["summary"]["rows"]:
        out.append(f"| {row['write_mib']} | {fmt_summary(row['commit_mib'], 0)} | "
                   f"{fmt_summary(row['commit_s'], 3)} | {fmt_summary(row['commit_mib_s'], 0)} | "
                   f"{row['commit_s']['n']} |")
    fit = p4["summary"].get("fit")
    if fit:
        out += ["", f"Least-squares fit: {fit['fixed_s'] * 1000:.0f} ms fixed + "
                f"{fit['seconds_per_gib']:.2f} s per GiB committed "
                f"(~{fmt(fit['mib_per_s'], 0)} MiB/s)."]
    out += ["", "These writes are sequential and land in the host's page cache: the best case. "
            "Writes made by a guest add their own cost and scatter across 64 KiB qcow2 "
            "clusters.", ""]
    return out


# -- plots ---------------------------------------------------------------------------------------
def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    machine = (f"{results['machine']['accelerator'].upper()}, QEMU "
               f"{results['machine']['qemu_version']}, {results['machine']['cores']} cores")
    chosen = results["benchmarks"]
    forks = results.get("forks")
    if forks and forks.get("summary", {}).get("rows"):
        if "P1" in chosen:
            made += _plot_p1(plt, forks, out, machine)
            made += _plot_phases(plt, forks, out, machine)
            made += _plot_timeline(plt, forks, out, machine)
        if "P3" in chosen:
            made += _plot_p3(plt, forks, out, machine)
    p4 = results.get("P4")
    if "P4" in chosen and p4 and p4.get("summary", {}).get("rows"):
        made += _plot_p4(plt, p4, out, machine)
    return made


def _series(rows: list[dict[str, Any]], variant: str, key: str):
    picked = [r for r in rows if r["variant"] == variant and r[key]["n"]]
    xs = [r["ram_mib"] for r in picked]
    med = [r[key]["median"] for r in picked]
    low = [r[key]["median"] - r[key]["min"] for r in picked]
    high = [r[key]["max"] - r[key]["median"] for r in picked]
    return xs, med, [low, high]


def _plain_log_y(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _ram_axis(ax, rows: list[dict[str, Any]]) -> None:
    sizes = sorted({r["ram_mib"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([ram_label(s) for s in sizes])
    ax.set_xlabel("guest RAM (70% filled)")
    ax.grid(True, which="both", alpha=0.3)


def _plot_p1(plt, p1: dict[str, Any], out: Path, machine: str) -> list[str]:
    rows = p1["summary"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    base = p1["summary"]["baseline_chunk_max"]
    for ax, keys, title in (
            (axes[0], (("tick_gap_ms", "gap", "o-"), ("tick_excess_ms", "excess", "s--")),
             "the guest's view: ticker gap across the pause"),
            (axes[1], (("pause_ms", "STOP->RESUME", "o-"),
                       ("qemu_downtime_ms", "QEMU downtime", "^:")),
             "QEMU's view")):
        for variant in VARIANTS:
            for key, what, style in keys:
                xs, med, err = _series(rows, variant, key)
                if xs:
                    ax.errorbar(xs, med, yerr=err, fmt=style, color=COLOUR[variant], capsize=3,
                                label=f"{SHORT[variant]}: {what}")
        ax.axhline(P1_TARGET_MS, color="green", lw=1, ls="--", label="target 20 ms")
        if base.get("n") and ax is axes[0]:
            ax.axhspan(base["q1"], base["q3"], color="grey", alpha=0.25,
                       label="ticker's largest gap per 1 s without a fork (quartiles)")
            ax.axhline(base["max"], color="grey", lw=0.8, ls=":",
                       label="... its maximum")
        ax.set_yscale("log")
        _plain_log_y(ax)
        _ram_axis(ax, rows)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("ms (median; bars: min-max)")
    fig.suptitle(f"P1: the parent's pause during the fork ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "p1_pause.png", dpi=110)
    plt.close(fig)
    return ["p1_pause.png"]


def _plot_phases(plt, p1: dict[str, Any], out: Path, machine: str) -> list[str]:
    rows = [r for r in p1["summary"]["rows"] if r["phase_migration_setup_ms"]["n"]
            and r["variant"] in BACKGROUND]  # stop-and-copy's RAM copy would dwarf them
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels, bottoms = [], [0.0] * len(rows)
    parts = (("phase_before_migrate_ms", "before migrate (kvmsnap: disk snapshot, QMP)",
              "tab:gray"),
             ("phase_migration_setup_ms", "QEMU migration setup", "tab:orange"),
             ("phase_to_resume_ms", "rest to RESUME (device state, write-protect, restart)",
              "tab:blue"))
    for key, what, colour in parts:
        heights = [r[key]["median"] or 0.0 for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottoms, color=colour, label=what)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    labels = [f"{ram_label(r['ram_mib'])}\n{SHORT[r['variant']]}" for r in rows]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.axhline(P1_TARGET_MS, color="green", lw=1, ls="--", label="target 20 ms")
    ax.set_ylabel("ms (medians, stacked)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"P1: where background-snapshot's STOP->RESUME goes ({machine})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "p1_phases.png", dpi=110)
    plt.close(fig)
    return ["p1_phases.png"]


def _plot_timeline(plt, p1: dict[str, Any], out: Path, machine: str) -> list[str]:
    examples = [r for r in p1["records"] if "timeline" in r]
    if not examples:
        return []
    largest = max(r["ram_mib"] for r in examples)
    picked = sorted((r for r in examples if r["ram_mib"] == largest),
                    key=lambda r: VARIANTS.index(r["variant"]))
    fig, axes = plt.subplots(len(picked), 1, figsize=(10, 2.6 * len(picked)), squeeze=False,
                             sharey=True)
    for ax, record in zip(axes[:, 0], picked, strict=True):
        line = record["timeline"]
        ax.plot([t for t, _ in line["gaps"]], [g for _, g in line["gaps"]], ".", ms=3,
                color=COLOUR.get(record["variant"], "k"))
        for start, end in line["pauses_s"]:
            ax.axvspan(start, max(end, start + 0.005), color="orange", alpha=0.4)
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(line["fork_end_s"], color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        _plain_log_y(ax)
        ax.set_ylabel("tick gap ms")
        ax.set_title(f"{ram_label(largest)} guest, {LABEL[record['variant']]}: orange = "
                     "STOP->RESUME; lines = backup start / end", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the backup started (each dot: a tick, at its arrival)")
    fig.suptitle(f"P1: ticker gaps around one backup ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "p1_timeline.png", dpi=110)
    plt.close(fig)
    return ["p1_timeline.png"]


def _plot_p3(plt, p3: dict[str, Any], out: Path, machine: str) -> list[str]:
    rows = p3["summary"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for variant in VARIANTS:
        xs, med, err = _series(rows, variant, "clone_restore_s")
        if xs:
            axes[0].errorbar(xs, med, yerr=err, fmt="o-", color=COLOUR[variant], capsize=3,
                             label=SHORT[variant])
        xs, med, err = _series(rows, variant, "clone_peak_rss_mib")
        if xs:
            axes[1].errorbar(xs, med, yerr=err, fmt="o-", color=COLOUR[variant], capsize=3,
                             label=f"clone peak RSS ({SHORT[variant]})")
    sizes = sorted({r["ram_mib"] for r in rows})
    axes[1].plot(sizes, sizes, "k:", lw=1, label="1.0 x guest RAM")
    axes[1].plot(sizes, [s * P3_TARGET_RATIO for s in sizes], "g--", lw=1,
                 label=f"target {P3_TARGET_RATIO:g} x guest RAM")
    fills = {r["ram_mib"]: r["fill_mib"] for r in rows}
    axes[1].plot(sizes, [fills[s] for s in sizes], color="grey", lw=1, ls="-.",
                 label="RAM filled with data")
    axes[0].set_ylabel("clone restore s (median; bars: min-max)")
    axes[1].set_ylabel("MiB")
    axes[1].set_yscale("log", base=2)
    _plain_log_y(axes[1])
    for ax in axes:
        _ram_axis(ax, rows)
        ax.legend(fontsize=7)
    fig.suptitle(f"P3: the clone's cost ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "p3_clone.png", dpi=110)
    plt.close(fig)
    return ["p3_clone.png"]


def _plot_p4(plt, p4: dict[str, Any], out: Path, machine: str) -> list[str]:
    good = [r for r in p4["records"] if "error" not in r and r.get("commit_s") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["commit_bytes"] / (1 << 20) for r in good], [r["commit_s"] for r in good], "o",
            alpha=0.5, label="each backup")
    rows = [r for r in p4["summary"]["rows"] if r["commit_s"]["n"] and r["commit_mib"]["n"]]
    ax.plot([r["commit_mib"]["median"] for r in rows], [r["commit_s"]["median"] for r in rows],
            "-", color="tab:blue", label="median")
    fit = p4["summary"].get("fit")
    if fit and rows:
        top = max(r["commit_mib"]["max"] for r in rows)
        ax.plot([0, top], [fit["fixed_s"], fit["fixed_s"] + fit["seconds_per_gib"] * top / 1024],
                "k:", label=f"fit: {fit['seconds_per_gib']:.2f} s/GiB")
    ax.set_xlabel("MiB committed (written to the parent's overlay during the backup)")
    ax.set_ylabel("commit seconds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"P4: live commit back ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "p4_commit.png", dpi=110)
    plt.close(fig)
    return ["p4_commit.png"]
