"""``python -m bench``: kvmsnap's benchmarks (``make bench``).

P1  the parent's pause as the guest sees it (background-snapshot vs stop-and-copy)
P2  end to end: fork + clean shutdown + archive (borg/restic, files/image) against plain
    borg/restic of an offline raw copy of the same ~2 GiB mixed-data disk, twice (dedup)
P3  the clone's cost: restore time and peak RSS against guest RAM
P4  block-commit time against what the parent wrote during the backup (qemu-io writes and
    guest-written files)
P5  files mode's two routes on the same ext4 image: a native read-only mount against the
    libguestfs route (what the host cannot mount: LVM, LUKS, vfat, NTFS)
P6  the pause with the guest RAM in transparent huge pages against hugetlbfs pages (P1's
    guests side by side, one per backing, on each QEMU build; grows the host's huge page
    pool by twice each guest's RAM while it runs, as root, and sets it back)

P1 and P3 come from the same forks, on each QEMU build of ``--qemu`` (default: Debian 12's 7.2
and QEMU 10.0 from bookworm-backports, ``make qemu10``): one guest per build, their forks
interleaved (which build goes first alternates between repetitions). P4 runs on each
build in turn; P2 on each build, the builds alternating per repetition.

Results go to OUT/results.json (every sample, the machine, the settings), OUT/RESULTS.md
(tables for the README) and OUT/*.png. A run of a subset (--only) keeps the other
benchmarks' results from OUT/results.json (each section says when and how it was measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import backing_bench, commit_bench, e2e_bench, fork_bench, guestfs_bench, report
from bench.common import Settings, machine_info, machine_line, progress, write_json
from kvmsnap_demo.builder import build_guest
from kvmsnap_demo.qemu_builds import BUILDS
from kvmsnap_plugin.host.probes import choose_accelerator

BENCHMARKS = ("P1", "P2", "P3", "P4", "P5", "P6")
DEFAULT_OUT = Path("bench/out")
#: where each benchmark's results live in results.json (P1 and P3 share their forks)
SECTION = {"P1": "forks", "P3": "forks", "P2": "P2", "P4": "P4", "P5": "P5", "P6": "P6"}
#: each section's summary, from its raw records (a run's, or a results.json's: --render-only)
SUMMARISE: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "forks": lambda section: fork_bench.summarise(section["records"]),
    "P4": lambda section: commit_bench.summarise(section["records"]),
    "P2": lambda section: e2e_bench.summarise(section["records"], section.get("reps")),
    "P5": lambda section: guestfs_bench.summarise(section["records"]),
    "P6": lambda section: backing_bench.summarise(section["records"])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256 MiB guest, small writes, a 512 MiB P2 disk, "
                        "1 repetition (~4 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: %(default)s)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="comma-separated subset of %(default)s")
    parser.add_argument("--reps", type=int, help="repetitions per method and size "
                        "(default: 6, P2: 3, or 1 with --quick); sets P2's too")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: re-summarise OUT/results.json and rewrite "
                        "RESULTS.md and the plots")
    parser.add_argument("--ram", help="P1/P3/P6 guest RAM sizes in MiB, comma-separated "
                        "(default: 256,1024,2048, or 256 with --quick)")
    parser.add_argument("--qemu", default=",".join(BUILDS),
                        help="QEMU builds: P1/P3 side by side, P4 one after the other "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    args.qemu_builds = tuple(q.strip() for q in args.qemu.split(",") if q.strip())
    if not args.qemu_builds or set(args.qemu_builds) - set(BUILDS):
        parser.error(f"--qemu takes a subset of {','.join(BUILDS)}")
    only = {p.strip().upper() for p in args.only.split(",") if p.strip()}
    unknown = only - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    try:
        args.ram_mib = tuple(int(x) for x in args.ram.split(",")) if args.ram else None
    except ValueError:
        parser.error("--ram takes MiB numbers, e.g. 256,1024")
    args.only_set = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render(args.out)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    # qemu.qmp logs every refused connect while a QEMU starts (kvmsnap retries): noise.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    settings = Settings.make(args.quick, args.out, args.only_set, args.reps, args.ram_mib,
                             args.qemu_builds)
    settings.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    guest = build_guest()
    accel, why = choose_accelerator(guest.kernel, guest.initrd)
    results: dict[str, Any] = {"machine": machine_info(accel, why),
                               "settings": settings.as_dict(),
                               "benchmarks": sorted(settings.only), "duration_s": 0.0,
                               "provenance": {}}
    progress(machine_line(results["machine"]))
    json_path = settings.out / "results.json"
    previous = _previous(json_path)
    runs = {"forks": lambda: fork_bench.run(settings, guest, accel),
            "P4": lambda: commit_bench.run(settings, guest, accel),
            "P2": lambda: e2e_bench.run(settings, guest, accel),
            "P5": lambda: guestfs_bench.run(settings),
            "P6": lambda: backing_bench.run(settings, guest, accel)}
    for key, run in runs.items():
        names = {name for name in settings.only if SECTION[name] == key}
        if names:
            section = time.monotonic()
            results[key] = run()
            _provenance(results, names, section)
            # Raw records are written before anything summarises them: a long run is never
            # lost.
            _save(results, json_path, started)
            results[key]["summary"] = SUMMARISE[key](results[key])
    results["duration_s"] = time.monotonic() - started
    if previous:
        kept = _carry_over(results, previous, settings.only)
        if kept:
            progress(f"kept {', '.join(kept)} from the previous {json_path.name}")
    return _finish(results, settings.out)


def _previous(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _provenance(results: dict[str, Any], benchmarks: set[str], started: float) -> None:
    entry = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "settings": results["settings"],
             "kvmsnap_commit": results["machine"]["kvmsnap_commit"],
             "duration_s": time.monotonic() - started}
    for name in benchmarks:
        results["provenance"][name] = entry


def _carry_over(results: dict[str, Any], previous: dict[str, Any],
                only: frozenset[str]) -> list[str]:
    """Keep the previous results of the benchmarks this run did not measure."""
    measured = {SECTION[b] for b in only}
    kept = []
    for name in previous.get("benchmarks", []):
        key = SECTION.get(name)
        if key is None or key in measured or key not in previous:
            continue
        results[key] = previous[key]
        old = previous.get("provenance", {}).get(name) or {
            "date": previous.get("machine", {}).get("date", "unknown"),
            "settings": previous.get("settings", {}),
            "kvmsnap_commit": previous.get("machine", {}).get("kvmsnap_commit", "unknown"),
            "duration_s": previous.get("duration_s"), "whole_run": True}
        results["provenance"][name] = old
        kept.append(name)
    results["benchmarks"] = sorted(set(results["benchmarks"]) | set(kept))
    return kept


def render(out: Path) -> int:
    """Summaries, RESULTS.md and plots again from a results.json (no QEMU runs)."""
    results = json.loads((out / "results.json").read_text())
    for key, summarise in SUMMARISE.items():
        if key in results:
            results[key]["summary"] = summarise(results[key])
    return _finish(results, out)


def _finish(results: dict[str, Any], out: Path) -> int:
    json_path = out / "results.json"
    plots = report.plots(results, out)
    results["plots"] = plots
    write_json(json_path, results)
    (out / "RESULTS.md").write_text(report.markdown(results, plots))
    progress(f"done in {results['duration_s'] / 60:.1f} min: {out / 'RESULTS.md'}, "
             f"{json_path.name}, {', '.join(plots) or 'no plots (matplotlib missing)'}")
    failures = sum(1 for key in SUMMARISE if key in results
                   for r in results[key]["records"] if "error" in r)
    if failures:
        progress(f"{failures} sample(s) failed; see 'error' in {json_path}")
    return 1 if failures else 0


def _save(results: dict[str, Any], path: Path, started: float) -> None:
    results["duration_s"] = time.monotonic() - started
    write_json(path, results)


if __name__ == "__main__":
    sys.exit(main())
