"""What re-collapsing the guest RAM's huge pages costs besides its CPU time (issue #15).

``python -m bench.collapse_bench [--ram 256,1024] [--fill 0.25] [--out bench/out]``

A guest that touched only part of its RAM (``--fill`` of it in a tmpfs, the rest as the
guest kernel left it) is forked with ``collapse_huge_pages`` off (background-snapshot: its
prepare step maps the shared zero page into every untouched page, its write faults split
the huge pages), then its RAM is re-collapsed by kvmsnap_plugin/host/hugepages.py under one
of two policies, on a fresh guest each:

- ``kvmsnap``: what kvmsnap does by default: only 2 MiB ranges with at most
  ``allowed_missing()`` pages absent (read from /proc/PID/pagemap);
- ``every range``: what it did before: MADV_COLLAPSE over the whole guest RAM (which
  ignores khugepaged's max_ptes_none and fills sparse ranges up).

Three rounds each (fork, collapse; ...): the guest's RSS before and after, the
collapse's time, and the ticker's largest gap during the collapse against the largest in
the second before it (the guest-visible stall). Writes OUT/collapse.json and OUT/COLLAPSE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import ticks
from bench.api import backup_once
from bench.common import machine_info, progress, short_dir, write_json
from bench.ticks import Ticker
from kvmsnap_demo.builder import build_guest
from kvmsnap_demo.vm import DemoOptions, demo_vm
from kvmsnap_plugin.host import hugepages
from kvmsnap_plugin.host.probes import choose_accelerator

POLICIES = {"kvmsnap": None, "every range": hugepages.PAGES_PER_HUGE}
ROUNDS = 3
SETTLE_S = 3.0  # after a fork: its clone and clean-up are gone


def _rss_mib(pid: int) -> float:
    return sum(m.rss_kib for m in hugepages.guest_ram(pid)) / 1024


def one_guest(guest: Any, accel: str, ram: int, fill: int, policy: str) -> list[dict[str, Any]]:
    records = []
    with contextlib.ExitStack() as stack:
        sockets = stack.enter_context(short_dir())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"kvmsnap-bench-collapse-{ram}-", dir="/var/tmp")))
        (tmp / "vm").mkdir()
        ticker = stack.enter_context(Ticker(sockets, tmp))
        vm = stack.enter_context(demo_vm(guest, accel, DemoOptions(
            memory_mib=ram, fill_mib=fill, ticker=True, extra_args=ticker.qemu_args),
            workdir=tmp / "vm"))
        vm.wait_ready(timeout=120 + 0.1 * fill)
        ticker.wait_flowing()
        for round_ in range(1, ROUNDS + 1):
            record: dict[str, Any] = {"ram_mib": ram, "fill_mib": fill, "policy": policy,
                                      "round": round_, "rss_at_boot_mib": _rss_mib(vm.pid)}
            outcome = backup_once(vm.paths.backup_qmp, tmp / f"fork{round_}",
                                  collapse_huge_pages=False)
            record["fork_pause_ms"] = outcome.pause_ms
            time.sleep(SETTLE_S + 1.0)  # then the baseline second
            record["rss_before_mib"] = _rss_mib(vm.pid)
            start = time.monotonic()
            result = hugepages.collapse(vm.pid, budget_s=1e9,
                                        max_missing=POLICIES[policy])
            end = time.monotonic()
            time.sleep(0.2)  # the tick after the collapse
            record["rss_after_mib"] = _rss_mib(vm.pid)
            arrivals = ticker.arrivals()
            during = ticks.largest(ticks.gaps(arrivals, start, end))
            before = ticks.largest(ticks.gaps(arrivals, start - 1.0, start))
            record.update(collapse=asdict(result), seconds=end - start,
                          stall_ms=during.ms if during else None,
                          baseline_max_gap_ms=before.ms if before else None)
            records.append(record)
            progress(f"  {ram} MiB ({fill} filled) {policy:11s} round {round_}: "
                     f"{result.collapsed_mib} MiB in {end - start:.2f} s, huge "
                     f"{result.share_before:.0%} -> {result.share_after:.0%}, RSS "
                     f"{record['rss_before_mib']:.0f} -> {record['rss_after_mib']:.0f} MiB, "
                     f"largest tick gap {record['stall_ms'] or 0:.1f} ms (second before: "
                     f"{record['baseline_max_gap_ms'] or 0:.1f} ms)")
    return records


def markdown(results: dict[str, Any]) -> str:
    out = ["## Re-collapsing huge pages: RSS and the guest's stall", "",
           f"Measured {results['date']} at {results['machine']['kvmsnap_commit']} "
           f"(`python -m bench.collapse_bench`; QEMU {results['qemu']}; host load "
           f"{results['machine'].get('loadavg', '?')} at the start). A guest with "
           f"{results['fill']:.0%} of its RAM filled (in a tmpfs), forked with "
           "`collapse_huge_pages` off, then its RAM re-collapsed; a fresh guest per policy, "
           "three rounds each. *kvmsnap*: only 2 MiB ranges with at most "
           f"{results['max_missing']} of 512 pages absent (pagemap); *every range*: "
           "MADV_COLLAPSE over the whole guest RAM, as before. *Stall*: the ticker's largest "
           "gap while collapsing; *base*: its largest gap in the second before (ms).", "",
           "| guest RAM (filled) | policy | round | collapsed MiB | left sparse MiB | s | "
           "THP before -> after | guest RSS before -> after MiB | stall | base |",
           "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in results["records"]:
        c = r["collapse"]
        out.append(f"| {r['ram_mib']} MiB ({r['fill_mib']} MiB) | {r['policy']} | "
                   f"{r['round']} | {c['collapsed_mib']} | {c['sparse_mib']} | "
                   f"{r['seconds']:.2f} | {c['share_before']:.0%} -> {c['share_after']:.0%} | "
                   f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} | "
                   f"{r['stall_ms'] or 0:.1f} | {r['baseline_max_gap_ms'] or 0:.1f} |")
    return "\n".join([*out, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.collapse_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram", default="256,1024", help="guest RAM sizes, MiB")
    parser.add_argument("--fill", type=float, default=0.25, help="share of RAM filled")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    guest = build_guest()
    accel, why = choose_accelerator(guest.kernel, guest.initrd)
    machine = machine_info(accel, why)
    machine["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    records = []
    for ram in (int(x) for x in args.ram.split(",")):
        for policy in POLICIES:
            records += one_guest(guest, accel, ram, int(ram * args.fill), policy)
    from kvmsnap_demo.qemu_builds import qemu_build

    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine,
               "fill": args.fill, "max_missing": hugepages.allowed_missing(),
               "qemu": qemu_build("7.2").version, "records": records}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "collapse.json", results)
    (args.out / "COLLAPSE.md").write_text(markdown(results))
    progress(f"wrote {args.out / 'COLLAPSE.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
