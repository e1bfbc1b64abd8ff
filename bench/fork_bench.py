"""P1 (the parent's pause as the guest sees it) and P3 (the clone's cost), from one set of forks.

For every guest RAM size one demo VM boots with ~70% of its RAM filled with random data and
its ticker on. It is then forked again and again, alternating background-snapshot and
stop-and-copy (ABBA order), so both methods meet the same guest and the same host noise.
Each fork records:

- the ticker's largest gap around the pause (host-side arrival times), located by the
  STOP/RESUME events the launcher's own QMP session receives (QEMU timestamps, converted
  to the monotonic clock), and the largest gap over the whole fork_vm call;
- the ticker's baseline in the seconds before the fork (no fork running);
- kvmsnap's own figures (pause_ms, QEMU downtime, disk snapshot, RAM save, restore, ...);
- the clone QEMU's peak RSS (VmHWM) and the size of the RAM state file.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import ticks
from bench.api import fork_once
from bench.common import MIB, Settings, load_snapshot, progress, short_dir, summary
from bench.sampler import ForkSampler
from bench.ticks import Ticker
from kvmsnap_plugin.demo.builder import DemoGuest
from kvmsnap_plugin.demo.vm import DemoOptions, DemoVM, demo_vm

BG = "background-snapshot"
SC = "stop-and-copy"
METHODS = (BG, SC)
TIMELINE_BEFORE_S = 1.0
TIMELINE_AFTER_S = 0.5


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    boots: list[dict[str, Any]] = []
    for ram in settings.ram_mib:
        size_records, boot = _one_size(settings, guest, accel, ram)
        records += size_records
        boots.append(boot)
    return {"records": records, "boots": boots, "summary": summarise(records)}


def fork_order(reps: int, warmup: bool) -> list[tuple[int, str]]:
    """(rep, method): ABBA so neither method always runs first; rep -1 is the warm-up."""
    order = [(-1, BG)] if warmup else []
    for rep in range(reps):
        order += [(rep, m) for m in (METHODS if rep % 2 == 0 else METHODS[::-1])]
    return order


def _one_size(settings: Settings, guest: DemoGuest, accel: str,
              ram: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fill = int(ram * settings.fill_ratio)
    records = []
    with contextlib.ExitStack() as stack:
        sockets = stack.enter_context(short_dir())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"kvmsnap-bench-p1-{ram}-", dir=settings.workdir_base)))
        (tmp / "vm").mkdir()
        ticker = stack.enter_context(Ticker(sockets, tmp))
        options = DemoOptions(memory_mib=ram, fill_mib=fill, ticker=True,
                              extra_args=ticker.qemu_args)
        progress(f"P1/P3: booting a {ram} MiB guest, {fill} MiB of it filled")
        started = time.monotonic()
        vm = stack.enter_context(demo_vm(guest, accel, options, workdir=tmp / "vm"))
        vm.wait_ready(timeout=120 + 0.1 * fill)
        boot = {"ram_mib": ram, "fill_mib": fill, "boot_s": time.monotonic() - started}
        ticker.wait_flowing()
        timelines: set[str] = set()
        for index, (rep, method) in enumerate(fork_order(settings.reps, settings.warmup)):
            time.sleep(settings.settle_s)
            record = _one_fork(settings, vm, ticker, tmp / f"fork{index}", method,
                               keep_timeline=rep >= 0 and method not in timelines)
            if "timeline" in record:
                timelines.add(method)
            record.update(ram_mib=ram, fill_mib=fill, rep=rep, warmup=rep < 0)
            records.append(record)
            progress(_describe(record))
            if not vm.running():
                raise RuntimeError(f"the {ram} MiB demo guest died during the benchmark")
    return records, boot


def _one_fork(settings: Settings, vm: DemoVM, ticker: Ticker, workdir: Path, method: str,
              keep_timeline: bool) -> dict[str, Any]:
    base_start = time.monotonic()
    time.sleep(settings.baseline_s)
    base_end = time.monotonic()
    vm.qmp.events()  # forget older events: the STOP/RESUME we read below are this fork's
    record: dict[str, Any] = {"method": method, **load_snapshot()}
    with ForkSampler(workdir) as sampler:
        t0 = time.monotonic()
        try:
            outcome = fork_once(vm.paths.backup_qmp, method, workdir)
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            return record
        finally:
            t1 = time.monotonic()
    time.sleep(0.2)  # the ticks that follow the fork
    record.update(sampler.result())
    pauses = _pauses(vm)
    arrivals = ticker.arrivals()
    base = ticks.baseline(arrivals, base_start, base_end)
    record.update(outcome.figures())
    record.update(fork_call_s=t1 - t0, baseline=base,
                  event_pauses_ms=[(r - s) * 1000 for s, r in pauses])
    pause_gaps = [g for s, r in pauses for g in ticks.gaps(arrivals, s, r)]
    pause_gap = ticks.largest(pause_gaps)
    fork_gap = ticks.largest(ticks.gaps(arrivals, t0, t1))
    record["tick_gap_ms"] = pause_gap.ms if pause_gap else None
    record["tick_gap_contains_pause"] = bool(pause_gap and any(
        pause_gap.start <= s and pause_gap.start + pause_gap.seconds >= r for s, r in pauses))
    interval = base["median_interval_ms"]
    record["tick_excess_ms"] = (pause_gap.ms - interval if pause_gap and interval else None)
    record["fork_max_gap_ms"] = fork_gap.ms if fork_gap else None
    record["fork_max_gap_at_s"] = fork_gap.start - t0 if fork_gap else None
    if keep_timeline:
        record["timeline"] = {
            "pauses_s": [(s - t0, r - t0) for s, r in pauses], "fork_end_s": t1 - t0,
            "gaps": [(round(g.start + g.seconds - t0, 4), round(g.ms, 2)) for g in
                     ticks.gaps(arrivals, t0 - TIMELINE_BEFORE_S, t1 + TIMELINE_AFTER_S)]}
    return record


def _pauses(vm: DemoVM) -> list[tuple[float, float]]:
    """(STOP, RESUME) pairs the launcher's QMP session saw, on the monotonic clock."""
    offset = statistics.median(time.time() - time.monotonic() for _ in range(5))
    pairs, stopped = [], None
    for event in vm.qmp.events():
        if event.name == "STOP" and stopped is None:
            stopped = event.timestamp - offset
        elif event.name == "RESUME" and stopped is not None:
            pairs.append((stopped, event.timestamp - offset))
            stopped = None
    return pairs


def _describe(record: dict[str, Any]) -> str:
    head = f"  {record['ram_mib']:5d} MiB {record['method']:19s} rep {record['rep']:2d}: "
    if "error" in record:
        return head + "FAILED " + record["error"]
    gap = record["tick_gap_ms"]
    return head + (f"tick gap {gap:7.1f} ms, pause {record['pause_ms']:7.1f} ms, "
                   f"downtime {record['qemu_downtime_ms']} ms, restore "
                   f"{record['clone_restore_s']:.2f} s, clone peak RSS "
                   f"{record['clone_peak_rss_bytes'] / MIB:.0f} MiB, baseline max gap "
                   f"{record['baseline']['max_gap_ms'] or 0:.1f} ms" if gap is not None else
                   f"no STOP/RESUME seen; pause {record['pause_ms']:.1f} ms")


# -- summaries ---------------------------------------------------------------------------------
def measured(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r.get("warmup") and "error" not in r]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = measured(records)
    sizes = sorted({r["ram_mib"] for r in good})
    rows = []
    for ram in sizes:
        for method in METHODS:
            rs = [r for r in good if r["ram_mib"] == ram and r["method"] == method]
            if not rs:
                continue
            rows.append({
                "ram_mib": ram, "method": method, "fill_mib": rs[0]["fill_mib"],
                **{key: summary(r[key] for r in rs) for key in (
                    "tick_gap_ms", "tick_excess_ms", "pause_ms", "qemu_downtime_ms",
                    "disk_snapshot_ms", "fork_max_gap_ms", "ram_save_s", "clone_restore_s",
                    "shutdown_s", "total_s")},
                "clone_peak_rss_mib": summary(r["clone_peak_rss_bytes"] / MIB for r in rs
                                              if r.get("clone_peak_rss_bytes")),
                "clone_rss_ratio": summary(r["clone_peak_rss_bytes"] / (ram * MIB) for r in rs
                                           if r.get("clone_peak_rss_bytes")),
                "ram_state_mib": summary(r["ram_state_bytes"] / MIB for r in rs
                                         if r.get("ram_state_bytes")),
                "baseline_max_gap_ms": summary(r["baseline"]["max_gap_ms"] for r in rs),
                "baseline_median_interval_ms": summary(r["baseline"]["median_interval_ms"]
                                                       for r in rs),
                "baseline_p99_ms": summary(r["baseline"]["p99_ms"] for r in rs),
                "clean": sum(1 for r in rs if r.get("clean")),
                "errors": sum(1 for r in records if r["ram_mib"] == ram
                              and r["method"] == method and "error" in r),
            })
    return {"rows": rows, "ratios": paired_ratios(good), "flatness": flatness(good),
            "baseline": summary(r["baseline"]["max_gap_ms"] for r in good),
            "baseline_interval": summary(r["baseline"]["median_interval_ms"] for r in good)}


def paired_ratios(good: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """stop-and-copy / background-snapshot, per repetition (the two ran back to back)."""
    out = []
    for ram in sorted({r["ram_mib"] for r in good}):
        pairs = []
        for rep in sorted({r["rep"] for r in good if r["ram_mib"] == ram}):
            by = {r["method"]: r for r in good if r["ram_mib"] == ram and r["rep"] == rep}
            if BG in by and SC in by:
                pairs.append((by[BG], by[SC]))
        entry: dict[str, Any] = {"ram_mib": ram, "pairs": len(pairs)}
        for key in ("tick_gap_ms", "pause_ms", "clone_restore_s", "total_s", "ram_save_s"):
            entry[key] = summary(sc[key] / bg[key] for bg, sc in pairs
                                 if bg.get(key) and sc.get(key) is not None)
        out.append(entry)
    return out


def flatness(good: list[dict[str, Any]]) -> dict[str, Any]:
    """How background-snapshot's pause grows with guest RAM: a least-squares slope per GiB."""
    out: dict[str, Any] = {}
    for key in ("pause_ms", "tick_gap_ms", "tick_excess_ms"):
        points = [(r["ram_mib"] / 1024, r[key]) for r in good
                  if r["method"] == BG and r.get(key) is not None]
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
