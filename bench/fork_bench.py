"""P1 (the parent's pause as the guest sees it) and P3 (the clone's cost), from one set of forks.

For every guest RAM size one demo VM boots with ~70% of its RAM filled with random data and
its ticker on. It is then forked again and again, in five variants per repetition, named by
what the guest RAM's transparent huge pages are like when kvmsnap is called and what kvmsnap
does with them (kvmsnap_plugin/host/hugepages.py, option ``collapse_huge_pages``: with it on,
kvmsnap re-collapses them before the pause and again right after the RAM snapshot, in the
background, so that the next backup finds them whole):

- ``bg-intact``: background-snapshot, option on, right after another "on" fork: the pages
  are whole and the pre-pause pass finds little to do (kvmsnap's default, back-to-back
  backups);
- ``bg-first``: background-snapshot, option on, right after a fork with it off that left
  the pages split: the pre-pause pass rebuilds them all (a first backup after kvmsnap ran
  without the option, or was killed before its rebuild);
- ``bg-fresh``: background-snapshot, option off, right after an "on" fork: the pages are
  whole and kvmsnap leaves them be (a VM's first backup with the option off);
- ``bg-split``: background-snapshot, option off, right after another "off" background
  fork, whose write faults left the pages split: back-to-back backups without the option;
- ``sc``: stop-and-copy (it does not touch the huge pages).

The chain that makes these states is :func:`fork_order`; all variants of a repetition run
on the same guest, one after the other, so that they meet the same guest and the same noise.

Each fork records:

- the ticker's largest gap around the pause (host-side arrival times), located by the
  STOP/RESUME events the launcher's own QMP session receives (QEMU timestamps, converted
  to the monotonic clock), and the largest gap over the whole backup;
- the ticker's baseline in the seconds before the fork (no fork running);
- kvmsnap's own figures (pause_ms, QEMU downtime, disk snapshot, RAM save, restore, ...);
- the clone QEMU's peak RSS (VmHWM) and the size of the RAM state file;
- the share of the parent's guest RAM in huge pages when kvmsnap is called and just before
  the pause (with the option on: after kvmsnap re-collapsed them, its report's
  ``huge_pages``, kept as ``collapse``), and the ticker's largest gap from the call into
  kvmsnap to the pause (where re-collapsing runs: what the guest feels of it);
- what re-collapsing after the RAM snapshot did (its report's ``huge_pages_after``, kept as
  ``collapse_after``; None with the option off or for stop-and-copy).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench import ticks
from bench.api import backup_once
from bench.common import MIB, Settings, load_snapshot, progress, short_dir, summary
from bench.sampler import ForkSampler
from bench.ticks import Ticker
from kvmsnap_demo.builder import DemoGuest
from kvmsnap_demo.qemu_builds import QemuBuild, qemu_build
from kvmsnap_demo.vm import DemoOptions, DemoVM, demo_vm
from kvmsnap_plugin.host import hugepages

BG = "background-snapshot"
SC = "stop-and-copy"
#: variant -> (method, kvmsnap's collapse_huge_pages); see the module and fork_order()
VARIANTS = {"bg-intact": (BG, True), "bg-first": (BG, True), "bg-fresh": (BG, False),
            "bg-split": (BG, False), "sc": (SC, False)}
BACKGROUND = tuple(variant for variant, (method, _) in VARIANTS.items() if method == BG)
#: the background variants in the order each repetition runs them: each one's huge pages
#: are what the one before left (stop-and-copy, first or last, leaves them as they are)
CHAIN = ("bg-first", "bg-intact", "bg-fresh", "bg-split")
TIMELINE_BEFORE_S = 1.0
TIMELINE_AFTER_S = 0.5
#: the window around the pause (each side) whose largest gap is compared with the baseline's
#: largest gap per 1 s (+ pause) window without a fork
WINDOW_S = 0.5
T = TypeVar("T")


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    """All the forks, on every QEMU build; :func:`summarise` the records afterwards."""
    builds = [qemu_build(name) for name in settings.qemu]  # fails now if one is missing
    records: list[dict[str, Any]] = []
    boots: list[dict[str, Any]] = []
    for ram in settings.ram_mib:
        try:
            boots += _one_size(settings, guest, accel, ram, builds, records)
        except Exception as exc:  # keep the other sizes' results
            progress(f"P1/P3 at {ram} MiB failed: {type(exc).__name__}: {exc}")
            records.append({"ram_mib": ram, "variant": "-", "method": "-", "rep": -1,
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=-6)})
    return {"records": records, "boots": boots,
            "qemu": {build.name: build.version for build in builds}}


def fork_order(reps: int, warmup: bool) -> list[tuple[int, str]]:
    """(rep, variant), the order one guest is forked in. Each background variant is named by
    the huge pages it meets, and those are what the fork before it left: a fork with
    ``collapse_huge_pages`` on leaves them whole (kvmsnap rebuilds them after the RAM
    snapshot), a background fork with it off leaves them split (its write faults), and
    stop-and-copy leaves them as they were. Hence the chain :data:`CHAIN`, the same in every
    repetition:

    - bg-first (on) after bg-split (off, split): the pre-pause pass rebuilds them all;
    - bg-intact (on) after bg-first (on): whole, the pre-pause pass finds little to do;
    - bg-fresh (off) after bg-intact (on): whole, nothing done;
    - bg-split (off) after bg-fresh (off, a background fork): split;

    and the next repetition's bg-first follows this one's bg-split. Stop-and-copy runs
    first in even repetitions and last in odd ones (both ends of the chain meet it, without
    breaking it). Rep -1 is the discarded warm-up (cold caches, first qemu-img): an "off"
    background fork recorded as bg-split, so that rep 0's bg-first follows split pages too
    (without a warm-up, rep 0's bg-first meets whatever the boot left)."""
    order = [(-1, "bg-split")] if warmup else []
    for rep in range(reps):
        variants = ["sc", *CHAIN] if rep % 2 == 0 else [*CHAIN, "sc"]
        order += [(rep, v) for v in variants]
    return order


def interleaved(order: list[tuple[int, str]], builds: list[T]) -> list[tuple[int, str, T]]:
    """(rep, variant, build): each repetition's variants on one build, then on the next;
    which build goes first alternates between repetitions (both meet the same noise)."""
    out = []
    for rep, group in itertools.groupby(order, key=lambda item: item[0]):
        variants = [variant for _, variant in group]
        for build in builds if rep % 2 == 0 else builds[::-1]:
            out += [(rep, variant, build) for variant in variants]
    return out


@dataclass
class Guest:
    """One build's demo VM of one RAM size, with its ticker."""

    build: QemuBuild
    vm: DemoVM
    ticker: Ticker
    tmp: Path
    boot: dict[str, Any]
    forks: int = 0


def _boot(stack: contextlib.ExitStack, settings: Settings, guest: DemoGuest, accel: str,
          ram: int, build: QemuBuild, qemu_args: tuple[str, ...] = (),
          name: str = "P1/P3") -> Guest:
    """A demo guest with ~``fill_ratio`` of its RAM filled and its ticker on; ``qemu_args``
    are added to its command line (P6: the RAM's memory backend)."""
    fill = int(ram * settings.fill_ratio)
    sockets = stack.enter_context(short_dir())
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
        prefix=f"kvmsnap-bench-{name.split('/')[0].lower().replace(' ', '-')}-{ram}"
               f"-q{build.name}-",
        dir=settings.workdir_base)))
    (tmp / "vm").mkdir()
    ticker = stack.enter_context(Ticker(sockets, tmp))
    options = DemoOptions(memory_mib=ram, fill_mib=fill, ticker=True,
                          extra_args=(*ticker.qemu_args, *qemu_args), binary=build.binary)
    progress(f"{name}: booting a {ram} MiB guest on QEMU {build.version}, {fill} MiB of it "
             "filled")
    started = time.monotonic()
    vm = stack.enter_context(demo_vm(guest, accel, options, workdir=tmp / "vm"))
    vm.wait_ready(timeout=120 + 0.1 * fill)
    boot = {"ram_mib": ram, "fill_mib": fill, "qemu": build.name,
            "qemu_version": build.version, "boot_s": time.monotonic() - started}
    ticker.wait_flowing()
    # MIGRATION events (setup/active/completed) time the phases inside the pause; the
    # capability only makes QEMU report them.
    vm.qmp.execute("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
    boot["guest_ram_mappings"] = len(hugepages.guest_ram(vm.pid))
    return Guest(build, vm, ticker, tmp, boot)


def _one_size(settings: Settings, guest: DemoGuest, accel: str, ram: int,
              builds: list[QemuBuild], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        guests = [_boot(stack, settings, guest, accel, ram, build) for build in builds]
        timelines: set[tuple[str, str]] = set()
        for rep, variant, on in interleaved(fork_order(settings.reps, settings.warmup),
                                            guests):
            method, recollapse = VARIANTS[variant]
            record: dict[str, Any] = {"ram_mib": ram, "fill_mib": on.boot["fill_mib"],
                                      "qemu": on.build.name, "qemu_version": on.build.version,
                                      "rep": rep, "warmup": rep < 0, "variant": variant,
                                      "method": method}
            time.sleep(settings.settle_s)
            record["thp_at_call"] = {"huge_share": hugepages.huge_share(
                hugepages.guest_ram(on.vm.pid))}
            first_timeline = rep >= 0 and (on.build.name, variant) not in timelines
            record.update(_one_fork(settings, on.vm, on.ticker, on.tmp / f"fork{on.forks}",
                                    method, recollapse, keep_timeline=first_timeline))
            collapsed = record.get("huge_pages")
            record["collapse"] = collapsed
            record["collapse_after"] = record.get("huge_pages_after")
            record["thp_before"] = ({"huge_share": collapsed["share_after"]} if collapsed
                                    else record["thp_at_call"])
            on.forks += 1
            if "timeline" in record:
                timelines.add((on.build.name, variant))
            records.append(record)
            progress(_describe(record))
            if not on.vm.running():
                raise RuntimeError(f"the {ram} MiB demo guest on QEMU {on.build.version} "
                                   "died during the benchmark")
    return [g.boot for g in guests]


def _one_fork(settings: Settings, vm: DemoVM, ticker: Ticker, workdir: Path, method: str,
              collapse: bool, keep_timeline: bool) -> dict[str, Any]:
    base_start = time.monotonic()
    time.sleep(settings.baseline_s)
    base_end = time.monotonic()
    vm.qmp.events()  # forget older events: the STOP/RESUME we read below are this fork's
    record: dict[str, Any] = load_snapshot()
    with ForkSampler(workdir) as sampler:
        t0 = time.monotonic()
        try:
            outcome = backup_once(vm.paths.backup_qmp, workdir, method=method,
                                  collapse_huge_pages=collapse)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=-6)
            return record
        finally:
            t1 = time.monotonic()
    time.sleep(0.2)  # the ticks that follow the fork
    record.update(sampler.result())
    pauses, phases = _events(vm)
    arrivals = ticker.arrivals()
    base = ticks.baseline(arrivals, base_start, base_end)
    record.update(outcome.figures())
    record.update(fork_call_s=t1 - t0, baseline=base,
                  event_pauses_ms=[(r - s) * 1000 for s, r in pauses])
    record.update(_phases(pauses, phases))
    pause_gaps = [g for s, r in pauses for g in ticks.gaps(arrivals, s, r)]
    pause_gap = ticks.largest(pause_gaps)
    fork_gap = ticks.largest(ticks.gaps(arrivals, t0, t1))
    window_gap = ticks.largest([g for s, r in pauses
                                for g in ticks.gaps(arrivals, s - WINDOW_S, r + WINDOW_S)])
    record["window_max_gap_ms"] = window_gap.ms if window_gap else None
    if pauses:  # how long after RESUME the guest's next tick arrived (<= one interval if
        # the guest ran at full speed once resumed)
        after = [a for a in arrivals if a >= pauses[-1][1]]
        record["resume_to_tick_ms"] = (after[0] - pauses[-1][1]) * 1000 if after else None
    written = sampler.state_written_by()
    record["ram_save_observed_s"] = (written - pauses[0][0] if written and pauses else None)
    if written and pauses and written > pauses[-1][1]:  # the guest ran while RAM was saved
        during = [g.ms for g in ticks.inside(arrivals, pauses[-1][1], written)]
        record["during_save_median_interval_ms"] = (statistics.median(during) if during
                                                    else None)
        record["during_save_max_gap_ms"] = max(during) if during else None
    record["tick_gap_ms"] = pause_gap.ms if pause_gap else None
    record["tick_gap_contains_pause"] = bool(pause_gap and any(
        pause_gap.start <= s and pause_gap.start + pause_gap.seconds >= r for s, r in pauses))
    interval = base["median_interval_ms"]
    record["tick_excess_ms"] = (pause_gap.ms - interval if pause_gap and interval else None)
    record["fork_max_gap_ms"] = fork_gap.ms if fork_gap else None
    if pauses:  # re-collapsing the huge pages runs here, before the pause: the gaps that
        # ended before it (the one holding the pause starts before STOP)
        before = ticks.largest([g for g in ticks.gaps(arrivals, t0, pauses[0][0])
                                if g.start + g.seconds <= pauses[0][0]])
        record["pre_pause_gap_ms"] = before.ms if before else None
    record["fork_max_gap_at_s"] = fork_gap.start - t0 if fork_gap else None
    if keep_timeline:
        record["timeline"] = {
            "pauses_s": [(s - t0, r - t0) for s, r in pauses], "fork_end_s": t1 - t0,
            "gaps": [(round(g.start + g.seconds - t0, 4), round(g.ms, 2)) for g in
                     ticks.gaps(arrivals, t0 - TIMELINE_BEFORE_S, t1 + TIMELINE_AFTER_S)]}
    return record


def _events(vm: DemoVM) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """(STOP, RESUME) pairs the launcher's QMP session saw, and the first time of each
    migration status, all on the monotonic clock."""
    offset = statistics.median(time.time() - time.monotonic() for _ in range(5))
    pairs, stopped = [], None
    phases: dict[str, float] = {}
    for event in vm.qmp.events():
        when = event.timestamp - offset
        if event.name == "STOP" and stopped is None:
            stopped = when
        elif event.name == "RESUME" and stopped is not None:
            pairs.append((stopped, when))
            stopped = None
        elif event.name == "MIGRATION":
            phases.setdefault(str(event.data.get("status")), when)
    return pairs, phases


def _phases(pauses: list[tuple[float, float]], phases: dict[str, float]) -> dict[str, Any]:
    """Where the pause went: kvmsnap's part before ``migrate`` (disk transaction, QMP round
    trips), QEMU's migration setup, and the rest up to RESUME (background-snapshot: device
    state, write-protecting RAM, restart; stop-and-copy: the whole RAM copy, then ``cont``)."""
    if not pauses or "setup" not in phases or "active" not in phases:
        return {}
    stop, resume = pauses[0][0], pauses[-1][1]
    return {"phase_before_migrate_ms": (phases["setup"] - stop) * 1000,
            "phase_migration_setup_ms": (phases["active"] - phases["setup"]) * 1000,
            "phase_to_resume_ms": (resume - phases["active"]) * 1000}


def _describe(record: dict[str, Any]) -> str:
    head = (f"  {record['ram_mib']:5d} MiB QEMU {record.get('qemu', '?'):4s} "
            f"{record['variant']:9s} rep {record['rep']:2d}: ")
    if "error" in record:
        return head + "FAILED " + record["error"]
    gap = record["tick_gap_ms"]
    return head + (f"tick gap {gap:7.1f} ms, pause {record['pause_ms']:7.1f} ms, "
                   f"downtime {record['qemu_downtime_ms']} ms, restore "
                   f"{record['clone_restore_s']:.2f} s, clone peak RSS "
                   f"{record['clone_peak_rss_bytes'] / MIB:.0f} MiB, baseline max gap "
                   f"{record['baseline']['max_gap_ms'] or 0:.1f} ms, huge pages "
                   f"{_huge(record)}" if gap is not None else
                   f"no STOP/RESUME seen; pause {record['pause_ms']:.1f} ms")


def _huge(record: dict[str, Any]) -> str:
    share = (record.get("thp_before") or {}).get("huge_share")
    after = record.get("collapse_after")
    return ("?" if share is None else f"{share:.0%}") + (
        f" ({after['collapsed_mib']} MiB rebuilt after the snapshot in {after['seconds']:.2f} s)"
        if after else "")


# -- summaries ---------------------------------------------------------------------------------
def measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("warmup") and "error" not in r]


PER_FORK = ("tick_gap_ms", "tick_excess_ms", "pause_ms", "qemu_downtime_ms", "disk_snapshot_ms",
            "phase_before_migrate_ms", "phase_migration_setup_ms", "phase_to_resume_ms",
            "fork_max_gap_ms", "window_max_gap_ms", "resume_to_tick_ms",
            "during_save_median_interval_ms", "during_save_max_gap_ms", "ram_save_s",
            "pre_pause_gap_ms",
            "ram_save_observed_s", "clone_restore_s", "shutdown_s", "total_s")


def qemu_of(record: dict[str, Any]) -> str:
    """The build a fork ran on ("system": results from before the version matrix)."""
    return record.get("qemu", "system")


def named_now(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records under today's variant names. Results from before the five variants (no
    ``collapse_after``: kvmsnap did not yet rebuild the huge pages after the RAM snapshot)
    called "bg-intact" what is bg-first now: it followed forks that had left the pages
    split, and its pre-pause pass rebuilt them all."""
    return [{**r, "variant": "bg-first"} if r.get("variant") == "bg-intact"
            and "collapse_after" not in r else r for r in records]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per QEMU build; the first build's summary also at the top (what one-build reports
    read), and the builds' paired ratios under "versions"."""
    records = named_now(records)
    builds = list(dict.fromkeys(qemu_of(r) for r in records if r.get("variant") in VARIANTS))
    by_qemu = {build: summarise_build([r for r in records if qemu_of(r) == build])
               for build in builds}
    first = by_qemu[builds[0]] if builds else summarise_build([])
    return {**first, "qemu": builds, "by_qemu": by_qemu,
            "versions": version_ratios(measured(records), builds)}


def version_ratios(good: list[dict[str, Any]], builds: list[str]) -> list[dict[str, Any]]:
    """Each later build against the first, per RAM size and variant: the same repetition's
    forks (run one right after the other), then the median of the ratios."""
    out = []
    for other in builds[1:]:
        for ram in sorted({r["ram_mib"] for r in good}):
            for variant in VARIANTS:
                by = {(qemu_of(r), r["rep"]): r for r in good
                      if r["ram_mib"] == ram and r["variant"] == variant}
                pairs = [(by[builds[0], rep], by[other, rep]) for q, rep in by
                         if q == other and (builds[0], rep) in by]
                if not pairs:
                    continue
                entry: dict[str, Any] = {"ram_mib": ram, "variant": variant,
                                         "ratio": f"{other}/{builds[0]}", "pairs": len(pairs)}
                for key in ("pause_ms", "tick_gap_ms", "tick_excess_ms", "clone_restore_s",
                            "total_s"):
                    entry[key] = summary(t[key] / b[key] for b, t in pairs
                                         if b.get(key) and t.get(key) is not None)
                out.append(entry)
    return out


def summarise_build(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = measured(records)
    done = _collapses(good)
    rows = []
    for ram in sorted({r["ram_mib"] for r in good}):
        for variant, (method, _) in VARIANTS.items():
            rs = [r for r in good if r["ram_mib"] == ram and r["variant"] == variant]
            if rs:
                rows.append(_row(ram, variant, method, rs, records))
    return {"rows": rows, "ratios": paired_ratios(good),
            "flatness": {v: flatness(good, v) for v in BACKGROUND},
            "baseline": summary(r["baseline"]["max_gap_ms"] for r in good),
            "baseline_chunk_max": summary(g for r in good
                                          for g in r["baseline"]["chunk_max_gaps_ms"]),
            "baseline_interval": summary(r["baseline"]["median_interval_ms"] for r in good),
            "collapse_unfinished_mib": summary(c.get("unfinished_mib") for c in done),
            "collapse_errors": sorted({e for c in done for e in c.get("errors", [])})}


def _collapses(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What every re-collapsing pass did, before the pause and after the RAM snapshot."""
    return [r[key] for r in records for key in ("collapse", "collapse_after") if r.get(key)]


def _collapse_figures(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per pass (``collapse``: before the pause, ``collapse_after``: after the RAM
    snapshot): seconds, MiB re-collapsed, the guest RAM's RSS growth, and the share of it
    in huge pages the pass found."""
    def of(r: dict[str, Any], key: str, name: str) -> Any:
        return (r.get(key) or {}).get(name)

    out: dict[str, Any] = {}
    for key in ("collapse", "collapse_after"):
        out[f"{key}_s"] = summary(of(r, key, "seconds") for r in rs)
        out[f"{key}_mib"] = summary(of(r, key, "collapsed_mib") for r in rs)
        out[f"{key}_rss_growth_mib"] = summary(of(r, key, "rss_growth_kib") / 1024 for r in rs
                                               if of(r, key, "rss_growth_kib") is not None)
        out[f"{key}_share_before"] = summary(of(r, key, "share_before") for r in rs)
    return out


def _row(ram: int, variant: str, method: str, rs: list[dict[str, Any]],
         records: list[dict[str, Any]]) -> dict[str, Any]:
    def huge(r: dict[str, Any]) -> float | None:
        return (r.get("thp_before") or {}).get("huge_share")

    return {
        "ram_mib": ram, "variant": variant, "method": method, "fill_mib": rs[0]["fill_mib"],
        **{key: summary(r.get(key) for r in rs) for key in PER_FORK},
        "huge_share_before": summary(huge(r) for r in rs),
        "huge_share_at_call": summary((r.get("thp_at_call") or {}).get("huge_share")
                                      for r in rs),
        **_collapse_figures(rs),
        "clone_peak_rss_mib": summary(r["clone_peak_rss_bytes"] / MIB for r in rs
                                      if r.get("clone_peak_rss_bytes")),
        "clone_rss_ratio": summary(r["clone_peak_rss_bytes"] / (ram * MIB) for r in rs
                                   if r.get("clone_peak_rss_bytes")),
        "ram_state_mib": summary(r["ram_state_bytes"] / MIB for r in rs
                                 if r.get("ram_state_bytes")),
        "clone_overhead_mib": summary((r["clone_peak_rss_bytes"] - r["ram_state_bytes"]) / MIB
                                      for r in rs if r.get("clone_peak_rss_bytes")
                                      and r.get("ram_state_bytes")),
        "baseline_max_gap_ms": summary(r["baseline"]["max_gap_ms"] for r in rs),
        "baseline_median_interval_ms": summary(r["baseline"]["median_interval_ms"] for r in rs),
        "baseline_chunk_max_ms": summary(g for r in rs
                                         for g in r["baseline"]["chunk_max_gaps_ms"]),
        "clean": sum(1 for r in rs if r.get("clean")),
        "errors": sum(1 for r in records if r.get("ram_mib") == ram
                      and r.get("variant") == variant and "error" in r),
    }


#: (numerator, denominator) variants of the paired ratios: against kvmsnap's default
#: (bg-intact); back-to-back backups without the option against a first one with it (what
#: results from before the five variants called bg-split / bg-intact); stop-and-copy against
#: background-snapshot without the option
RATIOS = (("sc", "bg-intact"), ("bg-first", "bg-intact"), ("bg-fresh", "bg-intact"),
          ("bg-split", "bg-intact"), ("bg-split", "bg-first"), ("sc", "bg-split"))


def paired_ratios(good: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per repetition (the variants ran back to back on the same VM), then the median."""
    out = []
    for ram in sorted({r["ram_mib"] for r in good}):
        for top, bottom in RATIOS:
            pairs = []
            for rep in sorted({r["rep"] for r in good if r["ram_mib"] == ram}):
                by = {r["variant"]: r for r in good if r["ram_mib"] == ram and r["rep"] == rep}
                if top in by and bottom in by:
                    pairs.append((by[bottom], by[top]))
            if not pairs:  # a variant these results do not have (older ones: three)
                continue
            entry: dict[str, Any] = {"ram_mib": ram, "ratio": f"{top}/{bottom}",
                                     "pairs": len(pairs)}
            for key in ("tick_gap_ms", "window_max_gap_ms", "pause_ms", "clone_restore_s",
                        "total_s", "ram_save_observed_s"):
                entry[key] = summary(t[key] / b[key] for b, t in pairs
                                     if b.get(key) and t.get(key) is not None)
            out.append(entry)
    return out


def flatness(good: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """How a background-snapshot variant's pause grows with guest RAM: slope per GiB."""
    out: dict[str, Any] = {}
    for key in ("pause_ms", "tick_gap_ms", "tick_excess_ms", "window_max_gap_ms"):
        points = [(r["ram_mib"] / 1024, r[key]) for r in good
                  if r["variant"] == variant and r.get(key) is not None]
        sizes = sorted({x for x, _ in points})
        if len(sizes) < 2:
            out[key] = None
            continue
        slope, intercept = statistics.linear_regression([x for x, _ in points],
                                                        [y for _, y in points])
        first = statistics.median(y for x, y in points if x == sizes[0])
        last = statistics.median(y for x, y in points if x == sizes[-1])
        out[key] = {"slope_ms_per_gib": slope, "intercept_ms": intercept,
                    "smallest_gib": sizes[0], "largest_gib": sizes[-1],
                    "median_smallest": first, "median_largest": last,
                    "ratio_largest_to_smallest": last / first if first else None}
    return out
