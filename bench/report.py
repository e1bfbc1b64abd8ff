"""RESULTS.md (tables the README can quote) and the PNG plots, from the results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, fmt_summary, machine_line

P1_TARGET_MS = 20.0
P3_TARGET_RATIO = 1.1
#: "flat": the largest RAM size's median within this factor (plus 1 ms) of the smallest's
FLAT_FACTOR = 1.25
BG = "background-snapshot"
SC = "stop-and-copy"
LABEL = {BG: "background-snapshot", SC: "stop-and-copy"}
COLOUR = {BG: "tab:blue", SC: "tab:red"}


def ram_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


# -- Markdown ------------------------------------------------------------------------------------
def markdown(results: dict[str, Any], plots: list[str]) -> str:
    settings = results["settings"]
    lines = ["# kvmsnap benchmarks", "",
             f"Measured {results['machine']['date']} on: {machine_line(results['machine'])}.",
             "",
             f"Run: {'quick smoke run' if settings['quick'] else 'full run'}, "
             f"{settings['reps']} repetition(s) per method and size, kvmsnap "
             f"{results['machine']['kvmsnap_commit']}, {results['duration_s'] / 60:.1f} min. "
             f"Host load while measuring: {_load_text(results)}.", "",
             "Figures are medians over the repetitions with [min-max] in brackets. Ratios are "
             "taken per repetition between the two methods run back to back on the same VM "
             "(alternating which goes first), then their median. Raw samples: "
             "`results.json`.", ""]
    chosen = results["benchmarks"]
    if "P1" in chosen and "forks" in results:
        lines += _p1(results["forks"], settings)
    if "P3" in chosen and "forks" in results:
        lines += _p3(results["forks"])
    if "P4" in chosen and "P4" in results:
        lines += _p4(results["P4"])
    lines += ["## Not measured here", "",
              "- P2 (end-to-end archive overhead against borg/restic of an offline raw copy) "
              "is not part of this suite yet: it needs the `kvmsnap backup` command with "
              "archive targets.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(lines)


def _load_text(results: dict[str, Any]) -> str:
    loads = [r.get("loadavg_1m") for key in ("forks", "P4") if key in results
             for r in results[key]["records"] if r.get("loadavg_1m") is not None]
    others = [r.get("other_qemu", 0) for key in ("forks", "P4") if key in results
              for r in results[key]["records"]]
    if not loads:
        return "not recorded"
    return (f"1-min load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{results['machine']['cores']} cores; up to {max(others)} QEMU processes of other "
            "users running at the same time")


def _p1(p1: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    summary = p1["summary"]
    rows = summary["rows"]
    base = summary["baseline"]
    interval = summary["baseline_interval"]
    out = ["## P1: the parent's pause as the guest sees it", "",
           f"A demo guest with {int(settings['fill_ratio'] * 100)}% of its RAM filled with "
           "random data (in a tmpfs) prints a tick every 10 ms on a serial port; the host "
           "stamps each tick's arrival. Under TCG the guest's clock stops while it is paused, "
           "so a pause of P ms shows as one gap of about (tick interval + P). *Gap* is the "
           "largest gap overlapping the pause (located by the STOP/RESUME events, QEMU's "
           "timestamps), *excess* is that gap minus the median tick interval (an estimate of "
           "P seen from outside), *STOP->RESUME* is kvmsnap's `pause_ms`, *QEMU downtime* is "
           "`query-migrate`'s figure, *worst gap* is the largest gap anywhere during the "
           "whole backup (clone, shutdown, commit included). All in ms.", "",
           "| guest RAM (filled) | method | gap | excess | STOP->RESUME | QEMU downtime | "
           "disk snapshot | worst gap during backup | n |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {ram_label(row['ram_mib'])} ({row['fill_mib']} MiB) | {row['method']} | "
                   f"{fmt_summary(row['tick_gap_ms'])} | {fmt_summary(row['tick_excess_ms'])} | "
                   f"{fmt_summary(row['pause_ms'])} | {fmt_summary(row['qemu_downtime_ms'], 0)} "
                   f"| {fmt_summary(row['disk_snapshot_ms'])} | "
                   f"{fmt_summary(row['fork_max_gap_ms'])} | {row['tick_gap_ms']['n']} |")
    out += ["", f"Ticker baseline (the same guests, {settings['baseline_s']:g} s without a fork "
            f"before each fork): median tick interval {fmt_summary(interval)} ms; the largest "
            f"gap per window {fmt_summary(base)} ms. A gap below that baseline maximum cannot "
            "be told apart from the ticker's own jitter.", "",
            "Ratios stop-and-copy / background-snapshot (paired per repetition):", "",
            "| guest RAM | STOP->RESUME | ticker gap | RAM save time | whole backup | pairs |",
            "|---|---:|---:|---:|---:|---:|"]
    for entry in summary["ratios"]:
        out.append(f"| {ram_label(entry['ram_mib'])} | {fmt_summary(entry['pause_ms'])}x | "
                   f"{fmt_summary(entry['tick_gap_ms'])}x | {fmt_summary(entry['ram_save_s'], 2)}x"
                   f" | {fmt_summary(entry['total_s'], 2)}x | {entry['pairs']} |")
    out += ["", "Against the target (background-snapshot, P1 <= 20 ms and flat across RAM "
            "sizes):", ""] + [f"- {v}" for v in p1_verdicts(p1)] + [""]
    return out


def p1_verdicts(p1: dict[str, Any]) -> list[str]:
    rows = [r for r in p1["summary"]["rows"] if r["method"] == BG]
    if not rows:
        return ["no background-snapshot samples"]
    verdicts = []
    for key, what in (("pause_ms", "STOP->RESUME (QEMU's view)"),
                      ("tick_excess_ms", "ticker excess (the guest's view, tick interval "
                       "removed)"),
                      ("tick_gap_ms", "raw ticker gap (tick interval included)")):
        worst = max((r[key]["median"] for r in rows if r[key]["median"] is not None),
                    default=None)
        high = max((r[key]["max"] for r in rows if r[key]["max"] is not None), default=None)
        if worst is None:
            continue
        verdicts.append(f"{what}: median {worst:.1f} ms at worst, single worst {high:.1f} ms "
                        f"-> {'met' if worst <= P1_TARGET_MS else 'NOT met'} (medians)"
                        f"{'' if high <= P1_TARGET_MS else '; not every repetition'}")
    base = p1["summary"]["baseline"]
    if base["median"] is not None and base["median"] >= 0.75 * P1_TARGET_MS:
        verdicts.append(f"the ticker alone already shows gaps of {base['median']:.1f} ms "
                        f"(median per window; max {base['max']:.1f} ms) without any fork: "
                        "under TCG on this host the raw gap cannot resolve a 20 ms target, "
                        "so the excess and STOP->RESUME are the figures to judge")
    flat = p1["summary"]["flatness"].get("pause_ms")
    if flat:
        is_flat = flat["median_largest"] <= FLAT_FACTOR * flat["median_smallest"] + 1.0
        verdicts.append(
            f"flatness (STOP->RESUME): {flat['median_smallest']:.1f} ms at "
            f"{flat['smallest_gib']:g} GiB -> {flat['median_largest']:.1f} ms at "
            f"{flat['largest_gib']:g} GiB, least-squares slope "
            f"{flat['slope_ms_per_gib']:+.1f} ms per GiB -> "
            f"{'flat' if is_flat else 'NOT flat'} (criterion: largest <= "
            f"{FLAT_FACTOR:g} x smallest + 1 ms)")
    return verdicts


def _p3(p3: dict[str, Any]) -> list[str]:
    out = ["## P3: the clone's cost", "",
           "*Restore* is `clone_restore_s` (the clone QEMU loading the RAM image). *Peak RSS* "
           "is the clone QEMU's `VmHWM`, polled every 20 ms from /proc while it runs. *RAM "
           "image* is the largest size the state file reached. Each clone also carries "
           "QEMU's own overhead (binary, TCG translation cache, device state).", "",
           "| guest RAM (filled) | method | restore s | clone peak RSS MiB | peak RSS / guest "
           "RAM | RAM image MiB | RAM save s | n |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in p3["summary"]["rows"]:
        out.append(f"| {ram_label(row['ram_mib'])} ({row['fill_mib']} MiB) | {row['method']} | "
                   f"{fmt_summary(row['clone_restore_s'], 2)} | "
                   f"{fmt_summary(row['clone_peak_rss_mib'], 0)} | "
                   f"{fmt_summary(row['clone_rss_ratio'], 2)} | "
                   f"{fmt_summary(row['ram_state_mib'], 0)} | {fmt_summary(row['ram_save_s'], 2)}"
                   f" | {row['clone_restore_s']['n']} |")
    out += ["", f"Against the target (clone peak RSS <= {P3_TARGET_RATIO:g}x guest RAM):", ""]
    out += [f"- {v}" for v in p3_verdicts(p3)] + [""]
    return out


def p3_verdicts(p3: dict[str, Any]) -> list[str]:
    verdicts = []
    for row in p3["summary"]["rows"]:
        ratio = row["clone_rss_ratio"]
        if not ratio["n"]:
            verdicts.append(f"{ram_label(row['ram_mib'])} {row['method']}: no RSS sample")
            continue
        verdicts.append(f"{ram_label(row['ram_mib'])} {row['method']}: {ratio['max']:.2f}x at "
                        f"worst -> {'met' if ratio['max'] <= P3_TARGET_RATIO else 'NOT met'}")
    return verdicts


def _p4(p4: dict[str, Any]) -> list[str]:
    out = ["## P4: block-commit time against what the parent wrote during the backup", "",
           f"A {p4['vm_ram_mib']} MiB demo guest with an extra, unmounted virtio disk; during "
           f"each backup ({p4['method']}), after the fork and before the commit back, QEMU's "
           "`qemu-io` writes N MiB sequentially through that disk's own BlockBackend, i.e. "
           "into the parent's overlay. *Committed* is the block job's length "
           "(`Commit.bytes`), *commit s* is `Commit.seconds` (block-commit, pivot, overlay "
           "removal).", "",
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
    out += ["", "These writes are sequential and land in host page cache: the best case. "
            "Writes made by a guest add their own cost and scatter across 64 KiB qcow2 "
            "clusters.", ""]
    return out


# -- plots ---------------------------------------------------------------------------------------
def plots(results: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs; returns their file names. Without matplotlib: none, and say so."""
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
    if "P1" in chosen and forks and forks["summary"]["rows"]:
        made += _plot_p1(plt, forks, out, machine)
        made += _plot_timeline(plt, forks, out, machine)
    if "P3" in chosen and forks and forks["summary"]["rows"]:
        made += _plot_p3(plt, forks, out, machine)
    if "P4" in results and results["P4"]["summary"]["rows"]:
        made += _plot_p4(plt, results["P4"], out, machine)
    return made


def _series(rows: list[dict[str, Any]], method: str, key: str, scale: float = 1.0):
    picked = [r for r in rows if r["method"] == method and r[key]["n"]]
    xs = [r["ram_mib"] for r in picked]
    med = [r[key]["median"] * scale for r in picked]
    low = [(r[key]["median"] - r[key]["min"]) * scale for r in picked]
    high = [(r[key]["max"] - r[key]["median"]) * scale for r in picked]
    return xs, med, [low, high]


def _ram_axis(ax, rows: list[dict[str, Any]]) -> None:
    sizes = sorted({r["ram_mib"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([ram_label(s) for s in sizes])
    ax.set_xlabel("guest RAM (70% filled)")
    ax.grid(True, which="both", alpha=0.3)


def _plot_p1(plt, p1: dict[str, Any], out: Path, machine: str) -> list[str]:
    rows = p1["summary"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    base = p1["summary"]["baseline"]
    for ax, keys, title in (
            (axes[0], (("tick_gap_ms", "ticker gap", "o-"),
                       ("tick_excess_ms", "gap - tick interval", "s--")),
             "the guest's view (host-side tick arrivals)"),
            (axes[1], (("pause_ms", "STOP->RESUME", "o-"),
                       ("qemu_downtime_ms", "QEMU downtime", "^:")),
             "QEMU's view")):
        for method in (BG, SC):
            for key, what, style in keys:
                xs, med, err = _series(rows, method, key)
                if xs:
                    ax.errorbar(xs, med, yerr=err, fmt=style, color=COLOUR[method], capsize=3,
                                label=f"{LABEL[method]}: {what}")
        ax.axhline(P1_TARGET_MS, color="green", lw=1, ls="--", label="target 20 ms")
        if base["n"] and ax is axes[0]:
            ax.axhspan(base["min"], base["max"], color="grey", alpha=0.2,
                       label="ticker's max gap without a fork")
        ax.set_yscale("log")
        _ram_axis(ax, rows)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("ms (median, bars: min-max)")
    fig.suptitle(f"P1: the parent's pause during the fork ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "p1_pause.png", dpi=110)
    plt.close(fig)
    return ["p1_pause.png"]


def _plot_timeline(plt, p1: dict[str, Any], out: Path, machine: str) -> list[str]:
    examples = [r for r in p1["records"] if "timeline" in r]
    if not examples:
        return []
    largest = max(r["ram_mib"] for r in examples)
    picked = [r for r in examples if r["ram_mib"] == largest]
    fig, axes = plt.subplots(len(picked), 1, figsize=(10, 2.6 * len(picked)), squeeze=False)
    for ax, record in zip(axes[:, 0], picked, strict=True):
        line = record["timeline"]
        xs = [t for t, _ in line["gaps"]]
        ys = [g for _, g in line["gaps"]]
        ax.plot(xs, ys, ".", ms=3, color=COLOUR.get(record["method"], "k"))
        for start, end in line["pauses_s"]:
            ax.axvspan(start, max(end, start + 0.005), color="orange", alpha=0.4)
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(line["fork_end_s"], color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel("tick gap ms")
        ax.set_title(f"{ram_label(largest)} guest, {record['method']}: orange = STOP->RESUME, "
                     "lines = backup start / end", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the backup started (host arrival of each tick)")
    fig.suptitle(f"P1: ticker gaps around one backup ({machine})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "p1_timeline.png", dpi=110)
    plt.close(fig)
    return ["p1_timeline.png"]


def _plot_p3(plt, p3: dict[str, Any], out: Path, machine: str) -> list[str]:
    rows = p3["summary"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in (BG, SC):
        xs, med, err = _series(rows, method, "clone_restore_s")
        if xs:
            axes[0].errorbar(xs, med, yerr=err, fmt="o-", color=COLOUR[method], capsize=3,
                             label=LABEL[method])
        xs, med, err = _series(rows, method, "clone_peak_rss_mib")
        if xs:
            axes[1].errorbar(xs, med, yerr=err, fmt="o-", color=COLOUR[method], capsize=3,
                             label=f"clone peak RSS ({LABEL[method]})")
    sizes = sorted({r["ram_mib"] for r in rows})
    axes[1].plot(sizes, sizes, "k:", lw=1, label="1.0 x guest RAM")
    axes[1].plot(sizes, [s * P3_TARGET_RATIO for s in sizes], "g--", lw=1,
                 label=f"target {P3_TARGET_RATIO:g} x guest RAM")
    fills = {r["ram_mib"]: r["fill_mib"] for r in rows}
    axes[1].plot(sizes, [fills[s] for s in sizes], color="grey", lw=1, ls="-.",
                 label="RAM filled with data")
    axes[0].set_ylabel("clone restore s (median, bars: min-max)")
    axes[1].set_ylabel("MiB")
    axes[1].set_yscale("log", base=2)
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
    rows = p4["summary"]["rows"]
    ax.plot([r["commit_mib"]["median"] for r in rows], [r["commit_s"]["median"] for r in rows],
            "-", color="tab:blue", label="median")
    fit = p4["summary"].get("fit")
    if fit:
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
