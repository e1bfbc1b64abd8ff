"""RESULTS.md (tables the README can quote) and the PNG plots, from the results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import fmt, fmt_summary, machine_line
from bench.fork_bench import named_now

P1_TARGET_MS = 20.0
P3_TARGET_RATIO = 1.1
P2_TARGET_RATIO = 1.3
#: "flat": the largest RAM size's median within this factor (plus 1 ms) of the smallest's
FLAT_FACTOR = 1.25
#: P1/P3's variants (bench/fork_bench.py), named by the huge pages the fork meets
VARIANTS = ("bg-intact", "bg-first", "bg-fresh", "bg-split", "sc")
LABEL = {"bg-intact": "background-snapshot, huge pages intact (kvmsnap's default, "
                      "back-to-back)",
         "bg-first": "background-snapshot, huge pages split, rebuilt before the pause",
         "bg-fresh": "background-snapshot without the option, huge pages intact (its first "
                     "backup)",
         "bg-split": "background-snapshot without the option, huge pages split (back-to-back)",
         "sc": "stop-and-copy"}
SHORT = {"bg-intact": "bg on, THP intact", "bg-first": "bg on, THP rebuilt",
         "bg-fresh": "bg off, THP intact", "bg-split": "bg off, THP split", "sc": "stop-and-copy"}
COLOUR = {"bg-intact": "tab:blue", "bg-first": "tab:cyan", "bg-fresh": "tab:brown",
          "bg-split": "tab:purple", "sc": "tab:red"}
BACKGROUND = ("bg-intact", "bg-first", "bg-fresh", "bg-split")
#: the variants with ``collapse_huge_pages`` on
COLLAPSING = ("bg-first", "bg-intact")

def ram_label(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


# -- Markdown ------------------------------------------------------------------------------------
def markdown(results: dict[str, Any], plots: list[str]) -> str:
    chosen = results["benchmarks"]
    prov = provenance(results)
    lines = ["# kvmsnap benchmarks", "",
             f"Measured on: {machine_line(results['machine'])}.", ""]
    lines += _provenance_table(results, prov)
    lines += ["", "Figures are medians over the repetitions with [min-max] in brackets. Ratios "
              "are taken per repetition between variants run back to back on the same VM "
              "(alternating which goes first), then their median. Raw samples: "
              "`results.json`.", ""]
    from bench import versions  # here: versions uses this module's names

    forks = results.get("forks")
    builds = versions.per_build(forks) if forks and "summary" in forks else []
    if "P1" in chosen:
        settings = prov.get("P1", {}).get("settings") or results["settings"]
        for index, (title, view) in enumerate(builds):
            lines += _p1(view, settings, title, intro=index == 0)
    if "P2" in chosen and "P2" in results and "summary" in results["P2"]:
        for index, (title, view) in enumerate(_build_views(results["P2"])):
            lines += _p2(view, title, intro=index == 0)
        lines += _p2_versus(results["P2"])
    if "P3" in chosen:
        for index, (title, view) in enumerate(builds):
            lines += _p3(view, title, intro=index == 0)
    if chosen and len(builds) > 1:
        lines += versions.markdown(forks)
    if "P4" in chosen and "P4" in results and "summary" in results["P4"]:
        for index, (title, view) in enumerate(_build_views(results["P4"])):
            lines += _p4(view, title, intro=index == 0)
    if "P5" in chosen and "P5" in results and "summary" in results["P5"]:
        from bench.guestfs_bench import markdown as p5_markdown

        lines += p5_markdown(results["P5"])
    if "P6" in chosen and "P6" in results and "summary" in results["P6"]:
        from bench.backing_bench import markdown as p6_markdown

        lines += p6_markdown(results["P6"])
    failed = [r for key in ("forks", "P2", "P4", "P6") if key in results
              for r in results[key]["records"] if "error" in r]
    if failed:
        lines += ["## Failed samples", ""]
        lines += [f"- {_failed_label(r)} rep {r.get('rep')}: {r['error']}"
                  for r in failed] + [""]
    missing = [b for b in ("P1", "P2", "P3", "P4") if b not in chosen]
    if missing:
        lines += ["## Not measured here", "",
                  f"- {', '.join(missing)}: not part of this results set (`python -m bench "
                  f"--only {','.join(missing)}` adds them).", ""]
    if plots:
        lines += ["## Plots", ""] + [f"- `{p}`" for p in plots] + [""]
    return "\n".join(lines)


def _failed_label(r: dict[str, Any]) -> str:
    if "backing" in r:
        return f"P6 {r.get('ram_mib', '')} MiB QEMU {r.get('qemu')} {r['backing']}"
    if "side" in r:
        return f"P2 run {r.get('run')} {r.get('tool')} {r.get('mode')} {r.get('side')}"
    if "write_mib" in r:
        return f"P4 {r.get('variant', 'qemu-io')} {r['write_mib']} MiB"
    return f"{r.get('ram_mib', '')} {r.get('variant', '')}"


SECTIONS = {"P1": "forks", "P3": "forks", "P2": "P2", "P4": "P4", "P5": "P5", "P6": "P6"}


def provenance(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """When and how each benchmark was measured (older results: the run's own figures)."""
    found = dict(results.get("provenance") or {})
    for name in results["benchmarks"]:
        found.setdefault(name, {"date": results["machine"].get("date", "unknown"),
                                "settings": results["settings"],
                                "kvmsnap_commit": results["machine"].get("kvmsnap_commit"),
                                "duration_s": results.get("duration_s"),
                                "whole_run": True})
    return found


def _provenance_table(results: dict[str, Any], prov: dict[str, dict[str, Any]]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name in sorted(results["benchmarks"]):
        entry = prov.get(name, {})
        groups.setdefault(f"{entry.get('date')}|{SECTIONS.get(name)}", []).append(name)
    out = ["| benchmarks | measured | run | repetitions | kvmsnap | minutes | host load |",
           "|---|---|---|---:|---|---:|---|"]
    for names in groups.values():
        entry = prov[names[0]]
        settings = entry.get("settings") or {}
        reps = settings.get("p2_reps", settings.get("reps")) if names == ["P2"] \
            else settings.get("reps")
        duration = entry.get("duration_s")
        section = results.get(SECTIONS.get(names[0], ""), {})
        out.append(f"| {', '.join(names)} | {entry.get('date')} | "
                   f"{'quick smoke run' if settings.get('quick') else 'full run'} | {reps} | "
                   f"{entry.get('kvmsnap_commit')} | "
                   f"{'-' if duration is None else f'{duration / 60:.1f}'}"
                   f"{' (whole run)' if entry.get('whole_run') else ''} | "
                   f"{_load_text(section.get('records', []), results['machine']['cores'])} |")
    return out


def _load_text(records: list[dict[str, Any]], cores: int) -> str:
    loads = [r["loadavg_1m"] for r in records if r.get("loadavg_1m") is not None]
    others = [r.get("other_qemu", 0) for r in records]
    if not loads:
        return "not recorded"
    return (f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {cores} cores; up to "
            f"{max(others)} QEMU processes of other users running at the same time")


def _collapse_lines(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """What re-collapsing the huge pages cost, per pass: before the pause (the pause waits
    for it) and after the RAM snapshot (in the background, for the next backup)."""
    def ran(row: dict[str, Any]) -> bool:
        return any((row.get(key) or {}).get("n") for key in ("collapse_s", "collapse_after_s"))

    picked = [r for r in rows if r["variant"] in COLLAPSING and ran(r)]
    if not picked:
        return []
    left = summary.get("collapse_unfinished_mib") or {}
    out = ["Re-collapsing the huge pages (option on), per pass: *before the pause* the pause "
           "waits for it; *after the snapshot* it runs in a thread once the RAM snapshot "
           "completed, while the clone shuts down, so that the next backup finds the pages "
           "whole. *s*: seconds; *MiB*: re-collapsed; *RSS*: the guest RAM's resident size "
           "after minus before (MiB); *THP found*: the share of the guest RAM in huge pages "
           "when the pass began"
           + (f"; left by the time budget {fmt_summary(left, 0)} MiB" if left.get("max")
              else "")
           + (f"; errors: {', '.join(summary['collapse_errors'])}"
              if summary.get("collapse_errors") else "") + ".", "",
           "| guest RAM | variant | before the pause: s | MiB | RSS | THP found | after the "
           "snapshot: s | MiB | RSS | THP found |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in picked:
        cells = [f"{fmt_summary(row.get(f'{key}_s') or {}, 2)} | "
                 f"{fmt_summary(row.get(f'{key}_mib') or {}, 0)} | "
                 f"{fmt_summary(row.get(f'{key}_rss_growth_mib') or {}, 1)} | "
                 f"{_pct(row.get(f'{key}_share_before') or {})}"
                 for key in ("collapse", "collapse_after")]
        out.append(f"| {ram_label(row['ram_mib'])} | {SHORT[row['variant']]} | "
                   f"{' | '.join(cells)} |")
    gaps = [f"{ram_label(r['ram_mib'])} {SHORT[r['variant']]} "
            f"{fmt_summary(r['pre_pause_gap_ms'])}" for r in rows
            if r["variant"] in BACKGROUND and (r.get("pre_pause_gap_ms") or {}).get("n")]
    if gaps:
        out += ["", "Largest tick gap that ended between the call into kvmsnap and the pause "
                "(the pass before the pause runs there with the option on), ms: "
                + "; ".join(gaps) + " (compare the baseline's largest gap per 1 s below)."]
    return [*out, ""]


def _p1(p1: dict[str, Any], settings: dict[str, Any], build: str = "",
        intro: bool = True) -> list[str]:
    summary = p1["summary"]
    rows = summary["rows"]
    interval = summary["baseline_interval"]
    out = [f"## P1: the parent's pause as the guest sees it{build}", ""]
    out += [f"A demo guest with {int(settings['fill_ratio'] * 100)}% of its RAM filled with "
           "random data (in a tmpfs) prints a tick every 10 ms on a serial port; the host "
           "stamps each tick's arrival. Under TCG the guest's clock stops while it is paused, "
           "so a pause of P ms shows as one gap of about (tick interval + P).", "",
           "Five variants per repetition, all on the same guest one after the other, named "
           "by the state of the guest RAM's transparent huge pages (THP) and by what kvmsnap "
           "does with them. With the option `collapse_huge_pages` (on by default) kvmsnap "
           "re-collapses the resident 2 MiB ranges with `process_madvise(MADV_COLLAPSE)` "
           "twice: before the pause, and right after the RAM snapshot in the background, "
           "because the snapshot's write faults split them; the next backup then finds them "
           "whole; and, since this session, it reads one byte of every 4 KiB page of guest RAM "
           "just before the pause (`process_vm_readv`): QEMU's prepare step in the pause "
           "reads every page too, and on this host, itself a VM, a cold read of the guest "
           "RAM costs several times a warm one. *bg on, THP intact*: option on, right after "
           "another fork with it on: the "
           "pages are whole and the pass before the pause finds little to do (kvmsnap's "
           "default, back-to-back backups). *bg on, THP rebuilt*: option on, right after a "
           "background fork that left the pages split (here one with the option off): the "
           "pass before the pause rebuilds them all (a first backup after kvmsnap ran without "
           "the option, or was killed before its rebuild). *bg off, THP intact*: option off, "
           "right after a fork with it on: the pages are whole and kvmsnap leaves them be (a "
           "VM's first backup with the option off; no read-ahead either). *bg off, THP "
           "split*: option off, right "
           "after another background fork with it off, whose write faults split the pages "
           "(back-to-back backups without the option). *stop-and-copy* (it leaves the huge "
           "pages as they are) runs first or last, alternating between repetitions; a "
           "discarded warm-up fork with the option off comes first, so that the first *THP "
           "rebuilt* meets split pages too.",
           "",
           "*Gap*: the largest tick gap overlapping the pause (located by the STOP/RESUME "
           "events, QEMU's timestamps). *Excess*: that gap minus the median tick interval, "
           "an estimate of the pause seen from outside. *+-0.5 s*: the largest gap within "
           "half a second either side of the pause. *RESUME->tick*: how long after RESUME "
           "the next tick arrived (at most one tick interval if the guest runs at full speed "
           "again). *STOP->RESUME*: kvmsnap's `pause_ms`. *QEMU downtime*: `query-migrate`'s "
           "figure (for stop-and-copy it leaves out the time the VM was already stopped). "
           "*Worst gap*: the largest gap anywhere during the whole backup (clone, shutdown, "
           "commit included). *THP*: share of the guest RAM in huge pages just before the "
           "pause (with the option on: after the pass before it; what the passes found is in "
           "the table of the passes below). "
           "All times in ms.", ""] if intro else []
    if intro and any("collapse_after" not in r for r in p1.get("records", [])
                     if r.get("variant") in VARIANTS):
        out += ["These results predate the five variants (kvmsnap did not yet rebuild the "
                "huge pages after the RAM snapshot, and this benchmark ran three variants): "
                "their *bg on, THP rebuilt* (called bg-intact then) followed a fork that had "
                "left the pages split, with the option on or off; the variants without rows "
                "did not run.", ""]
    out += ["| guest RAM (filled) | variant | gap | excess | +-0.5 s | RESUME->tick | "
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
    out += _collapse_lines(summary, rows)
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


def _p3(p3: dict[str, Any], build: str = "", intro: bool = True) -> list[str]:
    out = [f"## P3: the clone's cost{build}", ""]
    out += ["*Restore*: `clone_restore_s` (the clone QEMU loading the RAM image). *Peak RSS*: "
           "the clone QEMU's `VmHWM`, polled every 20 ms from /proc while it runs. *RAM "
           "image*: the largest size the state file reached (zero pages are not stored). "
           "*RSS - image*: the clone's own overhead beyond the guest pages it loaded (QEMU "
           "binary and libraries, TCG translation cache, device state). *RAM save*: from "
           "STOP until the state file stopped growing (observed every 20 ms), because "
           "kvmsnap's `ram_save_s` (`query-migrate` total-time) can read 0 for background "
           "snapshots on QEMU 7.2.", ""] if intro else []
    out += ["| guest RAM (filled) | variant | restore s | clone peak RSS MiB | peak RSS / guest "
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


P2_PHASES = (("preflight", "preflight (lock, describe VM, repository checks)", "tab:gray"),
             ("fork", "fork (overlays, pause, RAM save)", "tab:blue"),
             ("clone_restore", "clone restore", "tab:cyan"),
             ("clone_shutdown", "clone shutdown (power button)", "tab:purple"),
             ("expose", "expose (clone start/exit, FUSE, loop, mount)", "tab:olive"),
             ("archive", "archive (borg/restic)", "tab:orange"),
             ("commit", "commit back", "tab:red"),
             ("other", "other (verify, unmount, cleanup)", "tab:brown"))
P2_BASELINE_PHASES = (("archive_s", "baseline: archive command", "tab:orange", None),
                      ("offline_copy_s", "baseline: offline copy (guest paused)", "white",
                       "//"))
P2_COMBOS = (("borg", "files"), ("borg", "image"), ("restic", "files"), ("restic", "image"))


def _build_views(section: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A benchmark run on each QEMU build in turn (P2, P4): (section title, the section with
    that build's summary) per build; no title when there was one build."""
    builds = section["summary"].get("qemu") or ["system"]
    names = section.get("qemu", {})
    return [(f" (QEMU {names.get(build, build)})" if len(builds) > 1 else "",
             {**section, "summary": section["summary"].get("by_qemu", {}).get(
                 build, section["summary"])})
            for build in builds]


def _p2_versus(p2: dict[str, Any]) -> list[str]:
    rows = p2["summary"].get("versus") or []
    if not rows:
        return []
    names = p2.get("qemu", {})
    first, second = rows[0]["first"], rows[0]["second"]
    out = ["## P2 on each QEMU, side by side", "",
           f"kvmsnap's whole backup on QEMU {names.get(second, second)} over the same backup on "
           f"QEMU {names.get(first, first)}, paired per repetition (same disk copy, data and "
           "steps; only the VM's QEMU differs), and the parent's pause (STOP->RESUME, ms).", "",
           f"| tool | mode | run | kvmsnap {second} / {first} | pause {first} | "
           f"pause {second} | pairs |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['tool']} | {r['mode']} | {r['run']} | {_x(r['ratio'], 2)} | "
                   f"{fmt_summary(r['pause_first_ms'])} | {fmt_summary(r['pause_second_ms'])} "
                   f"| {r['pairs']} |")
    return [*out, ""]


def _p2(p2: dict[str, Any], title: str = "", intro: bool = True) -> list[str]:
    rows = p2["summary"]["rows"]
    disk = p2.get("disk", {})
    kinds = disk.get("kinds", {})
    content = ", ".join(f"{info['bytes'] / (1 << 20):.0f} MiB of {kind} ({info['files']} "
                        "files)" for kind, info in kinds.items())
    reps = max((r["pairs"] for r in rows), default=0)
    out = [f"## P2: end to end, against borg/restic of an offline raw copy{title}", ""]
    text = [f"A {p2['vm_ram_mib']} MiB demo guest on a {disk.get('size_mib', '?')} MiB virtio "
           f"disk (qcow2) holding an ext4 with {content} and "
           f"{disk.get('fs_free_mib', 0):.0f} MiB free, built host-side once "
           "(`bench/mixed_disk.py`: text from /usr/include, /usr/share/doc, ...; binaries "
           "from /usr/bin and /usr/lib; seeded random data; zero-filled files). Its workload "
           "appends a line to a log every 0.1 s; the lines stay in the guest's page cache "
           "(ext4 `commit=600`, no periodic writeback).", "",
           f"{reps} repetition(s), each on a fresh copy of the disk and fresh repositories "
           "(one per tool, mode and side), with two runs: run 2 goes into run 1's "
           "repositories after the guest ran on (and logged) for the minutes run 1 took, and "
           "shows deduplication. In each run, per tool and mode, kvmsnap and the baseline "
           "run back to back (alternating which goes first; the four combinations rotate):",
           "",
           f"- *kvmsnap*: one backup (`pipeline.backup`, {p2['method']}, one archive target): "
           "fork, clone, power button, expose, archive, verify, commit back, timed from the "
           "call to its return. Its archive step runs the same borg/restic command line as "
           "the baseline (plus tags), reading the clone's disk from qemu-storage-daemon: "
           "restic image through its NBD export (`nbdcopy`), borg image through its FUSE "
           "export's loop device, files through a read-only loop mount of it.",
           "- *baseline*: the archive command alone, timed from its start to its exit: "
           "`borg create --compression lz4` (image: `--chunker-params fixed,4194304`, as "
           "kvmsnap) / `restic backup` (image: `--stdin --stdin-filename disk.raw` from the "
           "raw file), on a raw copy of the same disk made offline: the guest paused "
           "(`stop`), `qemu-img convert -U -O raw`, resumed; files: that copy loop-mounted "
           "read-only (`ro,noload`) at the same path in both runs. *With copy* adds the "
           "offline copy (the guest's downtime) and the loop mount.",
           "",
           "*kvmsnap / baseline* is the ratio the target is about (the P2 target: <= "
           f"{P2_TARGET_RATIO:g}x); *archive step / baseline* compares the archive commands "
           "alone (what reading through the clone's exported disk costs).", ""]
    out += text if intro else ["As above, with the VM (its clone, its commit) on this QEMU.",
                               ""]
    out += ["| tool | mode | run | kvmsnap s | its archive step s | baseline s | baseline "
           "with copy s | kvmsnap / baseline | kvmsnap / baseline with copy | archive step / "
           "baseline | n |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['tool']} | {r['mode']} | {r['run']} | {fmt_summary(r['kvmsnap_s'])} "
                   f"| {fmt_summary(r['kvmsnap_archive_s'])} | {fmt_summary(r['baseline_s'])} "
                   f"| {fmt_summary(r['baseline_with_copy_s'])} | {_x(r['ratio'], 2)} | "
                   f"{_x(r['ratio_with_copy'], 2)} | {_x(r['archive_ratio'], 2)} | "
                   f"{r['pairs']} |")
    out += ["", "Where kvmsnap's time goes (medians, seconds; the phases' medians need not add "
            "up to the median total). *Preflight*: from the call to the last "
            "`kvmsnap_pre_backup` hook (journal lock, describing the VM, the archiver's "
            "repository check: `borg info` / `restic cat config`). *Fork*: to "
            "`kvmsnap_snapshot` (clone plan, overlays, the pause, the RAM save). *Clone "
            "restore*, *clone shutdown*: kvmsnap's `clone_restore_s`, `shutdown.seconds`. "
            "*Expose*: the rest up to `kvmsnap_post_shutdown` (clone QEMU start and exit, FUSE "
            "export, loop device, mount). *Archive*: the archivers' own seconds. *Commit*: "
            "the block-commit back. *Other*: verify, unmount, stopping the export, journal, "
            "removing the work directory.", "",
            "| tool | mode | run | preflight | fork | clone restore | clone shutdown | "
            "expose | archive | commit | other | kvmsnap s | baseline s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ph = r["phases"]
        out.append(f"| {r['tool']} | {r['mode']} | {r['run']} | "
                   + " | ".join(fmt(ph[key]["median"], 2) for key, _, _ in P2_PHASES)
                   + f" | {fmt(r['kvmsnap_s']['median'])} | {fmt(r['baseline_s']['median'])} |")
    dedup = p2["summary"].get("dedup", [])
    if dedup:
        out += ["", "Deduplication: run 2 against run 1, same repository (*stored*: new data "
                "the run added, borg's `deduplicated_size` / restic's `data_added`; "
                "*growth*: the repository's size on disk, after run 2 minus after run 1).", "",
                "| tool | mode | side | run 1 s | run 2 s | run 2 / run 1 | stored run 1 MiB | "
                "stored run 2 MiB | growth run 2 MiB |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for d in dedup:
            out.append(f"| {d['tool']} | {d['mode']} | {d['side']} | "
                       f"{fmt_summary(d['run1_s'])} | {fmt_summary(d['run2_s'])} | "
                       f"{_x(d['time_ratio'], 2)} | {fmt_summary(d['run1_stored_mib'])} | "
                       f"{fmt_summary(d['run2_stored_mib'], 2)} | "
                       f"{fmt_summary(d['repo_growth_mib'], 2)} |")
        out += ["", "The baseline's copy is crash-consistent (the guest was paused, not shut "
                "down): the log lines in the guest's page cache are not in it, so its run 2 "
                "finds almost nothing new. kvmsnap's clone wrote them out when it shut down, "
                "so kvmsnap's run 2 stores them, with the journal and metadata blocks the "
                "clean unmount touched (and, for images, its own small VM record)."]
    out += ["", f"Against the target (kvmsnap <= {P2_TARGET_RATIO:g}x the baseline's archive "
            "command):", ""] + [f"- {v}" for v in p2_verdicts(p2)] + [""]
    return out


def p2_verdicts(p2: dict[str, Any]) -> list[str]:
    summary = p2["summary"]
    rows = [r for r in summary["rows"] if r["ratio"].get("n")]
    if not rows:
        return ["no P2 samples"]
    verdicts = []
    for r in rows:
        ratio = r["ratio"]
        base, kv = r["baseline_s"]["median"], r["kvmsnap_s"]["median"]
        fixed = r["kvmsnap_overhead_s"]["median"]
        step = r["kvmsnap_archive_s"]["median"] - base
        spread = "" if ratio["n"] == 1 else f" [{ratio['min']:.2f}-{ratio['max']:.2f}]"
        verdicts.append(
            f"{r['tool']} {r['mode']}, run {r['run']}: {ratio['median']:.2f}x{spread} -> "
            f"{'met' if ratio['median'] <= P2_TARGET_RATIO else 'NOT met'}: "
            f"{kv - base:+.1f} s against the baseline's {base:.1f} s: {fixed:.1f} s outside "
            f"the archive step, {step:+.1f} s in it (archive step "
            f"{r['archive_ratio']['median']:.2f}x)")
    fixed = [r["kvmsnap_overhead_s"]["median"] for r in rows]
    need = max(fixed) / (P2_TARGET_RATIO - 1)
    short = [f"{r['tool']} {r['mode']} run {r['run']} ({r['baseline_s']['median']:.1f} s)"
             for r in rows if r["baseline_s"]["median"] < need]
    verdicts.append(
        f"Fixed cost: kvmsnap spends {_span(fixed)} s per backup outside the archive "
        "step (medians per row; the phase table says where). Even with an archive step as "
        f"fast as the baseline's, {P2_TARGET_RATIO:g}x needs a baseline of at least "
        f"~{need:.0f} s" + (f"; shorter here: {', '.join(short)}" if short else "") + ".")
    path = summary.get("read_path") or {}
    if path.get("export_mib_s", {}).get("n"):
        image = [r for r in rows if r["mode"] == "image"]
        files = [r for r in rows if r["mode"] == "files"]
        steps = ", ".join(f"{r['tool']} run {r['run']} {r['archive_ratio']['median']:.2f}x"
                          for r in image)
        file_steps = ", ".join(f"{r['tool']} run {r['run']} "
                               f"{r['archive_ratio']['median']:.2f}x" for r in files)
        verdicts.append(
            "Read path: the clone's disk read whole through kvmsnap's FUSE export "
            f"(qemu-storage-daemon, qcow2 overlay on the frozen image) at "
            f"{fmt_summary(path['export_mib_s'], 0)} MiB/s, the baseline's raw copy (sparse, "
            f"in the host's page cache) at {fmt_summary(path['raw_mib_s'], 0)} MiB/s"
            + (f"; through a loop device on that export with direct I/O (what borg's image "
               f"mode reads) at {fmt_summary(path['loop_mib_s'], 0)} MiB/s"
               if (path.get("loop_mib_s") or {}).get("n") else "")
            + ". Image archives read every byte of the disk, free space included: "
            f"archive step {steps}. borg's image mode hashes fast (fixed 4 MiB chunks; "
            "all-zero chunks are not hashed), so the read weighs most there. File archives "
            "read only the files, through a loop mount of the export (with the kernel's page "
            f"cache in front): archive step {file_steps}.")
    restic = [r for r in rows if r["tool"] == "restic"]
    if restic:
        pre = [r["phases"]["preflight"]["median"] for r in restic]
        record = [r["record_archive_s"]["median"] for r in restic if r["mode"] == "image"
                  and (r.get("record_archive_s") or {}).get("median")]
        verdicts.append(
            f"restic: kvmsnap's preflight (`restic cat config`, which opens the repository "
            f"and derives its key) costs {_span(pre)} s"
            + (f"; in image mode the VM record is a second restic snapshot, its run started "
               f"with the disk's and ended once the disk was saved ({_span(record)} s after "
               "it)" if record else "") + ".")
    copy = summary.get("offline_copy_s") or {}
    with_copy = [r["ratio_with_copy"]["median"] for r in rows if r["ratio_with_copy"].get("n")]
    pause = summary.get("pause_ms") or {}
    if copy.get("n") and with_copy and pause.get("n"):
        verdicts.append(
            f"Counting the offline copy the baseline needs (the guest paused "
            f"{fmt_summary(copy)} s for it; kvmsnap paused it {pause['median']:.0f} ms "
            f"[{pause['min']:.0f}-{pause['max']:.0f}]), kvmsnap takes "
            f"{_span(with_copy, 2)}x the baseline's time.")
    return verdicts


def _span(values: list[float], digits: int = 1) -> str:
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _p4(p4: dict[str, Any], build: str = "", intro: bool = True) -> list[str]:
    rows = p4["summary"]["rows"]
    variants = [v for v in ("qemu-io", "guest") if any(r.get("variant", "qemu-io") == v
                                                       for r in rows)]
    out = [f"## P4: block-commit time against what the parent wrote during the backup{build}",
           "", *_p4_intro(p4, variants)] if intro else [
        f"## P4: block-commit time against what the parent wrote during the backup{build}", ""]
    out += ["| written MiB | writer | committed MiB | commit s | commit MiB/s | write s | "
            "write MiB/s | n |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["write_mib"],
                                           variants.index(r.get("variant", "qemu-io")))):
        write_rate = row.get("write_mib_s") or {}
        out.append(f"| {row['write_mib']} | {row.get('variant', 'qemu-io')} | "
                   f"{fmt_summary(row['commit_mib'], 1)} | {fmt_summary(row['commit_s'], 3)} | "
                   f"{fmt_summary(row['commit_mib_s'], 0)} | {fmt_summary(row['write_s'], 2)} "
                   f"| {fmt_summary(write_rate, 0)} | {row['commit_s']['n']} |")
    return out + _p4_fits(p4, rows)


def _p4_intro(p4: dict[str, Any], variants: list[str]) -> list[str]:
    out = [f"A {p4['vm_ram_mib']} MiB demo guest; each backup ({p4['method']}) has N MiB "
           "written into the parent's overlay after the fork and before the commit back, by "
           "one of two writers (side by side on the same VM, alternating order):", "",
           "- *qemu-io*: QEMU's `qemu-io` writes N MiB sequentially through an extra, "
           "unmounted virtio disk's own BlockBackend, while the clone's disks are exposed "
           "(block layer only: the best case);"]
    if "guest" in variants:
        out += [f"- *guest*: the guest itself writes an N MiB file of zeros to its ext4 data "
                f"disk ({p4.get('guest_disk_mib', '?')} MiB, vda) with `dd conv=fsync`, asked "
                "on its third serial port from kvmsnap's `kvmsnap_snapshot` hook (the parent "
                "runs again, the clone has not started); the hook returns once the guest "
                "reports the write done. The same file is rewritten each time (dd truncates "
                "it)."]
    out += ["", "*Committed*: the block job's length (`Commit.bytes`: the overlay's allocated "
            "data, ext4's journal and metadata included). *Commit s*: `Commit.seconds` "
            "(block-commit, pivot, overlay removal). *Write s*: from the request to the writer "
            "reporting it done (guest: host-observed, console polled every 50 ms).", ""]
    return out


def _p4_fits(p4: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    fits = p4["summary"].get("fits") or {"qemu-io": p4["summary"].get("fit")}
    fit_lines = [f"{variant}: {fit['fixed_s'] * 1000:.0f} ms fixed + "
                 f"{fit['seconds_per_gib']:.2f} s per GiB committed "
                 f"(~{fmt(fit['mib_per_s'], 0)} MiB/s)"
                 for variant, fit in fits.items() if fit]
    if fit_lines:
        out += ["", "Least-squares fits: " + "; ".join(fit_lines) + "."]
    paired = _p4_guest_vs_qemu_io(rows)
    if paired:
        out += ["", "Guest-written against qemu-io, by commit time (medians): " + "; ".join(
            paired) + "."]
    out += ["", _p4_conclusion(rows, fits), ""]
    return out


def _p4_conclusion(rows: list[dict[str, Any]], fits: dict[str, Any]) -> str:
    text = ("qemu-io's writes are sequential, through the block layer only; the guest's are "
            "an ext4 file (extents, plus journal and metadata blocks).")
    guest, qemu_io = fits.get("guest"), fits.get("qemu-io")
    if not (guest and qemu_io and qemu_io["seconds_per_gib"] > 0):
        return text
    ratio = guest["seconds_per_gib"] / qemu_io["seconds_per_gib"]
    text += (f" Per GiB committed, the guest's data took {ratio:.2f}x as long as qemu-io's "
             f"({guest['seconds_per_gib']:.2f} vs {qemu_io['seconds_per_gib']:.2f} s/GiB)")
    text += (": the commit's cost follows the MiB the overlay holds, not who wrote them."
             if 0.8 <= ratio <= 1.25 else ".")
    big = max((r for r in rows if r.get("variant") == "guest" and r["write_mib"]),
              key=lambda r: r["write_mib"], default=None)
    if big and big["commit_mib"].get("n") and big["write_mib_s"].get("n"):
        extra = big["commit_mib"]["median"] - big["write_mib"]
        text += (f" Writing {big['write_mib']} MiB the guest added {extra:.1f} MiB of ext4 "
                 "metadata and journal to the overlay; the writing itself (the guest under "
                 f"TCG, fsync'ed: {big['write_mib_s']['median']:.0f} MiB/s) is the slow "
                 "part, and it happens while the parent runs, before the commit.")
    return text


def _p4_guest_vs_qemu_io(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r.get("variant", "qemu-io"), r["write_mib"]): r for r in rows}
    out = []
    for (variant, mib), guest in sorted(by.items(), key=lambda kv: kv[0][1]):
        other = by.get(("qemu-io", mib))
        if variant != "guest" or not mib or not other:
            continue
        g, q = guest["commit_s"]["median"], other["commit_s"]["median"]
        if g and q:
            out.append(f"{mib} MiB: {g:.3f} s vs {q:.3f} s ({g / q:.2f}x)")
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
        from bench import versions  # here: versions uses this module's names

        # the single-build plots show the system's QEMU, the one `machine` names
        views = versions.per_build(forks)
        system = f"QEMU {results['machine'].get('qemu_version')})"
        first = next((view for title, view in views if title.endswith(system)), views[0][1])
        if "P1" in chosen:
            made += _plot_p1(plt, first, out, machine)
            made += _plot_phases(plt, first, out, machine)
            made += _plot_timeline(plt, first, out, machine)
        if "P3" in chosen:
            made += _plot_p3(plt, first, out, machine)
        made += versions.plot(plt, forks, out, machine.split(", QEMU")[0])
    p2 = results.get("P2")
    if "P2" in chosen and p2 and p2.get("summary", {}).get("rows"):
        made += _plot_p2(plt, p2, out, machine)
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
    examples = [r for r in named_now(p1["records"]) if "timeline" in r]
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


def _plot_p2(plt, p2: dict[str, Any], out: Path, machine: str) -> list[str]:
    """Stacked bars per tool/mode: kvmsnap's phases next to the baseline, one panel per
    run; a red tick marks the target (1.3 x the baseline's archive command)."""
    rows = p2["summary"]["rows"]
    runs = sorted({r["run"] for r in rows})
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 6), squeeze=False)
    width = 0.38
    for ax, run in zip(axes[0], runs, strict=True):
        by = {(r["tool"], r["mode"]): r for r in rows if r["run"] == run}
        combos = [c for c in P2_COMBOS if c in by]
        for index, combo in enumerate(combos):
            row = by[combo]
            x = index - width / 2
            bottom = 0.0
            for key, what, colour in P2_PHASES:
                height = max(row["phases"][key]["median"] or 0.0, 0.0)
                ax.bar(x, height, width, bottom=bottom, color=colour, edgecolor="black",
                       linewidth=0.3, label=what if index == 0 else None)
                bottom += height
            x = index + width / 2
            bottom = 0.0
            for key, what, colour, hatch in P2_BASELINE_PHASES:
                stats = row["baseline_s"] if key == "archive_s" else row["offline_copy_s"]
                height = stats["median"] or 0.0
                ax.bar(x, height, width, bottom=bottom, color=colour, hatch=hatch,
                       edgecolor="black", linewidth=0.3, alpha=0.6 if hatch is None else 1.0,
                       label=what if index == 0 else None)
                bottom += height
            base = row["baseline_s"]["median"]
            if base:
                ax.plot([index - width, index], [P2_TARGET_RATIO * base] * 2, color="red",
                        lw=1.5, label=(f"target: {P2_TARGET_RATIO:g} x baseline archive"
                                       if index == 0 else None))
            ratio = row["ratio"]["median"]
            if ratio:
                top = max(row["kvmsnap_s"]["median"], P2_TARGET_RATIO * (base or 0.0))
                ax.annotate(f"{ratio:.2f}x", (index - width / 2, top),
                            textcoords="offset points", xytext=(0, 4), ha="center",
                            fontsize=8)
        ax.set_xticks(range(len(combos)))
        ax.set_xticklabels([f"{tool} {mode}\nkvmsnap | baseline" for tool, mode in combos],
                           fontsize=8)
        ax.set_ylabel("seconds (medians)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(f"run {run}" + (" (first backup into fresh repositories)" if run == 1
                                     else " (same repositories: deduplication)"), fontsize=10)
        ax.margins(y=0.08)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7.5, frameon=False)
    size = p2.get("disk", {}).get("size_mib", "?")
    fig.suptitle(f"P2: kvmsnap end to end vs borg/restic of an offline raw copy ({size} MiB "
                 f"mixed-data disk; {machine}); label: kvmsnap / baseline archive", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out / "p2_end_to_end.png", dpi=110)
    plt.close(fig)
    return ["p2_end_to_end.png"]


P4_STYLE = {"qemu-io": ("tab:blue", "o"), "guest": ("tab:green", "s")}


def _plot_p4(plt, p4: dict[str, Any], out: Path, machine: str) -> list[str]:
    good = [r for r in p4["records"] if "error" not in r and r.get("commit_s") is not None]
    fits = p4["summary"].get("fits") or {"qemu-io": p4["summary"].get("fit")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for variant, (colour, marker) in P4_STYLE.items():
        mine = [r for r in good if r.get("variant", "qemu-io") == variant]
        if not mine:
            continue
        ax.plot([r["commit_bytes"] / (1 << 20) for r in mine], [r["commit_s"] for r in mine],
                marker, color=colour, alpha=0.4, label=f"{variant}: each backup")
        rows = [r for r in p4["summary"]["rows"] if r.get("variant", "qemu-io") == variant
                and r["commit_s"]["n"] and r["commit_mib"]["n"]]
        ax.plot([r["commit_mib"]["median"] for r in rows],
                [r["commit_s"]["median"] for r in rows], "-", color=colour,
                label=f"{variant}: median")
        fit = fits.get(variant)
        if fit and rows:
            top = max(r["commit_mib"]["max"] for r in rows)
            ax.plot([0, top], [fit["fixed_s"],
                               fit["fixed_s"] + fit["seconds_per_gib"] * top / 1024],
                    ":", color=colour, label=f"{variant} fit: {fit['seconds_per_gib']:.2f} s/GiB")
    ax.set_xlabel("MiB committed (written to the parent's overlay during the backup)")
    ax.set_ylabel("commit seconds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("live commit back", fontsize=10)
    ax = axes[1]
    for variant, (colour, marker) in P4_STYLE.items():
        mine = [r for r in good if r.get("variant", "qemu-io") == variant and r["write_mib"]]
        if mine:
            ax.plot([r["write_mib"] for r in mine], [r["write_s"] for r in mine], marker,
                    color=colour, alpha=0.5, label=f"{variant}: writing N MiB")
    ax.set_xlabel("MiB written during the backup")
    ax.set_ylabel("seconds to write (host-observed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("the writes themselves (not part of the commit)", fontsize=10)
    fig.suptitle(f"P4: live commit back against what was written ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "p4_commit.png", dpi=110)
    plt.close(fig)
    return ["p4_commit.png"]
