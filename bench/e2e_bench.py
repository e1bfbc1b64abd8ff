"""P2: kvmsnap end to end against plain borg/restic of an offline raw copy of the same disk.

Per repetition a demo guest (256 MiB RAM) boots on its own copy of the cached mixed-data
disk (bench/mixed_disk.py; its workload appends a line to /mnt/vda/workload.log every
0.1 s). Then two *runs*; run 2 goes into the same repositories as run 1 and shows
deduplication (the guest has written its workload lines in between). In each run:

1. the offline copy: the guest is paused (QMP ``stop``: QEMU flushes), ``qemu-img convert
   -U -O raw`` makes a raw copy of its disk, the guest runs on (``cont``); the copy is
   loop-mounted read-only (``ro,noload``) at the same path in both runs;
2. for each tool (borg, restic) and mode (files, image), kvmsnap and the baseline run back
   to back, in alternating order (and a rotating order of the four combinations), each
   into its own repository (fresh per repetition, reused by run 2):

   - kvmsnap: ``pipeline.backup`` with one archive target: fork, clone, power button,
     expose, archive, verify, commit back; timed from the call to its return and split
     into phases by hook timestamps (bench/api.py ``phases``). Its archivers read the
     clone's disk as kvmsnap does (restic image: the NBD export through nbdcopy; borg image:
     the FUSE export's loop device, read with direct I/O; files: a read-only mount of it);
   - baseline: the archive command alone on the copy (bench/baseline.py), timed from its
     start to its exit. *With copy* adds the run's offline copy (and, for files, the loop
     mount) to it: what a backup of a stopped VM costs in all.

Each side's bytes read and stored (borg ``deduplicated_size``, restic ``data_added``) and
the repository's size on disk are recorded. Ratios are kvmsnap / baseline, paired per
repetition and run, then the median over repetitions.

Every repetition runs on each QEMU build of ``--qemu`` (kvmsnap_demo/qemu_builds.py), the
builds alternating which goes first: the guest, its clone and the commit run on that
build's QEMU; qemu-storage-daemon and qemu-img stay the system's (kvmsnap uses the host's
tools whatever QEMU the VM runs). The builds' kvmsnap times are paired per repetition.

At the end of each repetition a diagnostic compares the read paths: the raw copy read
whole (4 MiB reads), and the clone's disk read whole through kvmsnap's FUSE export and
through a loop device on it with direct I/O (borg image's path), in one more backup without
archive targets (``on_exposed``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import baseline
from bench.api import PHASES, TargetSpec, backup_once, phases
from bench.common import MIB, Settings, load_snapshot, progress, summary
from bench.mixed_disk import cached_disk, describe, loop_mounted
from kvmsnap_demo.builder import DemoGuest
from kvmsnap_demo.qemu_builds import QemuBuild, qemu_build
from kvmsnap_demo.vm import DemoOptions, DemoVM, demo_vm
from kvmsnap_plugin.disks.expose import read_ahead
from kvmsnap_plugin.host import mounts

METHOD = "background-snapshot"
VM_RAM_MIB = 256
TOOLS = ("borg", "restic")
MODES = ("files", "image")
COMBOS = tuple((tool, mode) for tool in TOOLS for mode in MODES)
SIDES = ("kvmsnap", "baseline")
RUNS = (1, 2)


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    """All repetitions, on each QEMU build of ``--qemu`` (the builds alternate which goes
    first in each repetition); :func:`summarise` the records afterwards."""
    builds = [qemu_build(name) for name in settings.qemu]  # fails now if one is missing
    image, manifest = cached_disk(settings.p2_disk_mib)
    progress(f"P2: {describe(manifest)}; {settings.p2_reps} repetition(s) on QEMU "
             + ", ".join(build.version for build in builds))
    records: list[dict[str, Any]] = []
    reps: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="kvmsnap-bench-p2-", dir=settings.workdir_base)))
        stack.enter_context(baseline.tool_env(tmp))
        for rep in range(settings.p2_reps):
            for build in builds if rep % 2 == 0 else builds[::-1]:
                mine: list[dict[str, Any]] = []
                repdir = tmp / f"rep{rep}-{build.name}"
                try:
                    info = _one_rep(guest, accel, image, repdir, rep, mine, build)
                    reps.append({**info, "qemu": build.name})
                except Exception as exc:  # keep the other repetitions' results
                    progress(f"P2 repetition {rep} on QEMU {build.version} failed: "
                             f"{type(exc).__name__}: {exc}")
                    mine.append({"rep": rep, "run": 0, "tool": "-", "mode": "-", "side": "-",
                                 "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=-6)})
                finally:
                    records += [{**r, "qemu": build.name, "qemu_version": build.version}
                                for r in mine]
                    shutil.rmtree(repdir, ignore_errors=True)
    return {"records": records, "reps": reps, "disk": manifest, "vm_ram_mib": VM_RAM_MIB,
            "method": METHOD, "qemu": {build.name: build.version for build in builds}}


def op_order(rep: int, run: int) -> list[tuple[str, str, str]]:
    """(tool, mode, side): the combinations rotate; kvmsnap and the baseline alternate
    which goes first, between combinations, runs and repetitions."""
    shift = (2 * rep + run - 1) % len(COMBOS)
    combos = COMBOS[shift:] + COMBOS[:shift]
    order = []
    for index, (tool, mode) in enumerate(combos):
        sides = SIDES if (rep + run + index) % 2 == 0 else SIDES[::-1]
        order += [(tool, mode, side) for side in sides]
    return order


def _one_rep(guest: DemoGuest, accel: str, image: Path, repdir: Path, rep: int,
             records: list[dict[str, Any]], build: QemuBuild) -> dict[str, Any]:
    repdir.mkdir(parents=True)
    started = time.monotonic()
    disk = repdir / "disk.qcow2"
    shutil.copyfile(image, disk)
    info: dict[str, Any] = {"rep": rep, "disk_copy_s": time.monotonic() - started}
    repos = {}
    for side in SIDES:
        for tool, mode in COMBOS:
            repo = repdir / "repos" / f"{side}-{tool}-{mode}"
            repo.parent.mkdir(exist_ok=True)
            baseline.init_repo(tool, repo)
            repos[side, tool, mode] = repo
    (repdir / "vm").mkdir()
    workdir = repdir / "kvmsnap"  # stable: the mount root (restic's paths) stays the same
    source = repdir / "copy"  # the baseline's mount: the same path in both runs
    (source / "vdisk0").mkdir(parents=True)
    options = DemoOptions(memory_mib=VM_RAM_MIB, binary=build.binary)
    with demo_vm(guest, accel, options, workdir=repdir / "vm",
                 disks=[disk]) as vm:
        vm.wait_ready(timeout=120)
        for run in RUNS:
            lines = vm.counter()
            raw = repdir / f"copy{run}.raw"
            copy_s = offline_copy(vm, disk, raw)
            info[f"run{run}"] = {"guest_lines": lines, "offline_copy_s": copy_s,
                                 "raw_allocated_mib": raw.stat().st_blocks * 512 / MIB}
            progress(f"P2 rep {rep} QEMU {build.version} run {run}: offline copy "
                     f"{copy_s:.1f} s (guest paused); guest at workload line {lines}")
            mount_started = time.monotonic()
            with loop_mounted(raw, source / "vdisk0"):
                mount_s = time.monotonic() - mount_started
                for tool, mode, side in op_order(rep, run):
                    record: dict[str, Any] = {"rep": rep, "run": run, "tool": tool,
                                              "mode": mode, "side": side, **load_snapshot()}
                    repo = repos[side, tool, mode]
                    try:
                        if side == "kvmsnap":
                            record.update(_kvmsnap(vm, workdir, tool, mode, repo))
                        else:
                            record.update(_baseline(tool, mode, repo, source, raw, run))
                            record.update(offline_copy_s=copy_s,
                                          mount_s=mount_s if mode == "files" else 0.0)
                    except Exception as exc:
                        record["error"] = f"{type(exc).__name__}: {exc}"
                        record["traceback"] = traceback.format_exc(limit=-6)
                    record["repo_bytes"] = baseline.repo_bytes(repo)
                    records.append(record)
                    progress(_describe(record))
                    if not vm.running():
                        raise RuntimeError("the P2 demo guest died during the benchmark")
            if run == RUNS[-1]:
                info["read_path"] = read_path(vm, workdir, raw)
                progress(f"P2 rep {rep}: reading the whole disk: raw copy "
                         f"{info['read_path']['raw_mib_s']:.0f} MiB/s, the clone's FUSE "
                         f"export {info['read_path']['export_mib_s']:.0f} MiB/s, its loop "
                         f"device (direct I/O) {info['read_path']['loop_mib_s']:.0f} MiB/s")
            raw.unlink()
    return info


def read_path(vm: DemoVM, workdir: Path, raw: Path) -> dict[str, Any]:
    """Seconds to read the whole raw copy, the whole exported clone disk (its FUSE file),
    and the same export through a loop device with direct I/O, as borg's image mode reads
    it (an exposure for image archives attaches its loop devices so)."""
    size = raw.stat().st_size
    out: dict[str, Any] = {"bytes": size, "raw_s": _read_all(raw)}

    def read_export(images: list[Path]) -> None:
        # Note: the first whole read after the export starts ran at 264-289 MiB/s here
        # whatever read it (this loop device, or the FUSE file when it went first), later
        # reads 4-8x faster; not explained (issue #15's note). The archivers' own seconds
        # are the end-to-end figure.
        with mounts.loop_attached(images[0], direct_io=True) as loop:
            read_ahead(loop)  # as the exposure's own loop devices
            out["loop_direct_io"] = mounts.loop_direct_io(loop)
            out["loop_s"] = _read_all(loop)
        out["export_s"] = _read_all(images[0])

    backup_once(vm.paths.backup_qmp, workdir, method=METHOD, on_exposed=read_export)
    for key in ("raw", "export", "loop"):
        out[f"{key}_mib_s"] = size / MIB / out[f"{key}_s"]
    return out


def _read_all(path: Path) -> float:
    buffer = bytearray(4 * MIB)
    started = time.monotonic()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.monotonic() - started


def offline_copy(vm: DemoVM, disk: Path, raw: Path) -> float:
    """Pause the guest, copy its disk to raw, resume it; seconds the guest was paused."""
    started = time.monotonic()
    vm.qmp.execute("stop")
    try:
        baseline_copy = ["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(raw)]
        baseline.run_command(baseline_copy)
    finally:
        vm.qmp.execute("cont")
    return time.monotonic() - started


def _kvmsnap(vm: DemoVM, workdir: Path, tool: str, mode: str, repo: Path) -> dict[str, Any]:
    outcome = backup_once(vm.paths.backup_qmp, workdir, method=METHOD,
                          targets=[TargetSpec(f"{tool}-{mode}", tool, mode, repo)])
    archives = outcome.archive_figures()
    stored = [a["stored_bytes"] for a in archives]
    return {"wall_s": outcome.wall_s, "total_s": outcome.total_s, "clean": outcome.clean,
            "label": outcome.label, "pause_ms": outcome.pause_ms,
            "archive_s": sum(a["seconds"] for a in archives),
            # restic's image mode snapshots the VM record in a second run (its seconds:
            # those after the disk's, the rest overlapped it)
            "record_archive_s": sum(a["seconds"] for a in archives
                                    if str(a.get("source", "")).endswith(".json")),
            "bytes": sum(a["bytes"] for a in archives),
            "stored_bytes": sum(stored) if None not in stored else None,
            "archives": archives, "phases": phases(outcome),
            "commits": outcome.figures()["commits"], "marks": outcome.marks}


def _baseline(tool: str, mode: str, repo: Path, source: Path, raw: Path,
              run: int) -> dict[str, Any]:
    done = baseline.archive(tool, mode, repo, source, f"baseline-run{run}", raw=raw)
    return {"archive_s": done["seconds"], "bytes": done["bytes"],
            "stored_bytes": done["stored_bytes"]}


def _describe(record: dict[str, Any]) -> str:
    head = (f"  rep {record['rep']} run {record['run']} {record['tool']:6s} "
            f"{record['mode']:5s} {record['side']:8s}: ")
    if "error" in record:
        return head + "FAILED " + record["error"]
    stored = record.get("stored_bytes")
    tail = (f"read {record['bytes'] / MIB:.0f} MiB, stored "
            f"{'-' if stored is None else f'{stored / MIB:.1f}'} MiB")
    if record["side"] == "kvmsnap":
        ph = record.get("phases") or {}
        return head + (f"{record['wall_s']:6.1f} s (archive {record['archive_s']:.1f} s, "
                       f"fork {ph.get('fork', 0):.1f}, clone {ph.get('clone_restore', 0):.1f}"
                       f"+{ph.get('clone_shutdown', 0):.1f}, expose {ph.get('expose', 0):.1f}, "
                       f"commit {ph.get('commit', 0):.2f}); {tail}")
    return head + f"{record['archive_s']:6.1f} s; {tail}"


# -- summaries ---------------------------------------------------------------------------------
def _total_with_copy(r: dict[str, Any]) -> float:
    return r["archive_s"] + r.get("offline_copy_s", 0.0) + r.get("mount_s", 0.0)


def summarise(records: list[dict[str, Any]],
              reps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per QEMU build ("system": results from before ``--qemu``), the first build's summary
    also at the top (what one-build reports and the plot read), and the builds' kvmsnap
    times paired per repetition."""
    builds = list(dict.fromkeys(r.get("qemu", "system") for r in records)) or ["system"]
    by_qemu = {build: summarise_build(
        [r for r in records if r.get("qemu", "system") == build],
        [r for r in reps or [] if r.get("qemu", "system") == build]) for build in builds}
    return {**by_qemu[builds[0]], "qemu": builds, "by_qemu": by_qemu,
            "versus": _versus(records, builds)}


def _versus(records: list[dict[str, Any]], builds: list[str]) -> list[dict[str, Any]]:
    """The second build's kvmsnap time over the first's, paired by repetition, per tool,
    mode and run (the same disk, data and steps; only the VM's QEMU differs)."""
    if len(builds) < 2:
        return []
    first, second = builds[:2]
    good = [r for r in records if "error" not in r and r.get("side") == "kvmsnap"]
    rows = []
    for tool, mode in COMBOS:
        for run in RUNS:
            mine = [r for r in good if (r["tool"], r["mode"], r["run"]) == (tool, mode, run)]
            a = {r["rep"]: r for r in mine if r.get("qemu") == first}
            b = {r["rep"]: r for r in mine if r.get("qemu") == second}
            both = sorted(a.keys() & b.keys())
            if both:
                rows.append({"tool": tool, "mode": mode, "run": run, "pairs": len(both),
                             "first": first, "second": second,
                             "ratio": summary(b[k]["wall_s"] / a[k]["wall_s"] for k in both),
                             "pause_first_ms": summary(a[k].get("pause_ms") for k in both),
                             "pause_second_ms": summary(b[k].get("pause_ms") for k in both)})
    return rows


def summarise_build(records: list[dict[str, Any]],
                    reps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    good = [r for r in records if "error" not in r and r.get("side") in SIDES]
    rows = []
    for tool, mode in COMBOS:
        for run in RUNS:
            ks = [r for r in good if (r["tool"], r["mode"], r["run"], r["side"])
                  == (tool, mode, run, "kvmsnap")]
            bs = [r for r in good if (r["tool"], r["mode"], r["run"], r["side"])
                  == (tool, mode, run, "baseline")]
            if not ks and not bs:
                continue
            pairs = _pairs(ks, bs)
            rows.append({
                "tool": tool, "mode": mode, "run": run,
                "kvmsnap_s": summary(r["wall_s"] for r in ks),
                "kvmsnap_archive_s": summary(r["archive_s"] for r in ks),
                "kvmsnap_overhead_s": summary(r["wall_s"] - r["archive_s"] for r in ks),
                "baseline_s": summary(r["archive_s"] for r in bs),
                "baseline_with_copy_s": summary(_total_with_copy(r) for r in bs),
                "offline_copy_s": summary(r.get("offline_copy_s") for r in bs),
                "ratio": summary(k["wall_s"] / b["archive_s"] for k, b in pairs),
                "ratio_with_copy": summary(k["wall_s"] / _total_with_copy(b) for k, b in pairs),
                "archive_ratio": summary(k["archive_s"] / b["archive_s"] for k, b in pairs),
                "kvmsnap_read_mib": summary(r["bytes"] / MIB for r in ks),
                "baseline_read_mib": summary(r["bytes"] / MIB for r in bs),
                "kvmsnap_stored_mib": summary(r["stored_bytes"] / MIB for r in ks
                                              if r.get("stored_bytes") is not None),
                "baseline_stored_mib": summary(r["stored_bytes"] / MIB for r in bs
                                               if r.get("stored_bytes") is not None),
                "kvmsnap_repo_mib": summary(r["repo_bytes"] / MIB for r in ks),
                "baseline_repo_mib": summary(r["repo_bytes"] / MIB for r in bs),
                "phases": {p: summary((r.get("phases") or {}).get(p) for r in ks)
                           for p in PHASES},
                "record_archive_s": summary(r.get("record_archive_s") for r in ks),
                "pause_ms": summary(r.get("pause_ms") for r in ks),
                "clean": sum(1 for r in ks if r.get("clean")),
                "pairs": len(pairs),
                "errors": sum(1 for r in records if "error" in r and (
                    r.get("tool"), r.get("mode"), r.get("run")) == (tool, mode, run)),
            })
    paths = [r["read_path"] for r in reps or [] if r.get("read_path")]
    copies = [r[f"run{run}"]["offline_copy_s"] for r in reps or [] for run in RUNS
              if f"run{run}" in r]
    return {"rows": rows, "dedup": _dedup(good),
            "read_path": {"raw_mib_s": summary(p["raw_mib_s"] for p in paths),
                          "export_mib_s": summary(p["export_mib_s"] for p in paths),
                          "loop_mib_s": summary(p.get("loop_mib_s") for p in paths)},
            "offline_copy_s": summary(copies),
            "pause_ms": summary(r.get("pause_ms") for r in good if r["side"] == "kvmsnap")}


def _pairs(ks: list[dict[str, Any]], bs: list[dict[str, Any]]):
    by_rep = {r["rep"]: r for r in bs}
    return [(k, by_rep[k["rep"]]) for k in ks if k["rep"] in by_rep
            and by_rep[k["rep"]]["archive_s"] > 0]


def _dedup(good: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run 2 against run 1 of the same side, tool, mode and repetition (same repository)."""
    out = []
    for tool, mode in COMBOS:
        for side in SIDES:
            rs = [r for r in good if (r["tool"], r["mode"], r["side"]) == (tool, mode, side)]
            by = {(r["rep"], r["run"]): r for r in rs}
            pairs = [(by[rep, 1], by[rep, 2]) for rep in sorted({r["rep"] for r in rs})
                     if (rep, 1) in by and (rep, 2) in by]
            if not pairs:
                continue
            key = "wall_s" if side == "kvmsnap" else "archive_s"
            out.append({
                "tool": tool, "mode": mode, "side": side, "pairs": len(pairs),
                "run1_s": summary(a[key] for a, _ in pairs),
                "run2_s": summary(b[key] for _, b in pairs),
                "time_ratio": summary(b[key] / a[key] for a, b in pairs if a[key]),
                "run1_stored_mib": summary(a["stored_bytes"] / MIB for a, _ in pairs
                                           if a.get("stored_bytes") is not None),
                "run2_stored_mib": summary(b["stored_bytes"] / MIB for _, b in pairs
                                           if b.get("stored_bytes") is not None),
                "repo_growth_mib": summary((b["repo_bytes"] - a["repo_bytes"]) / MIB
                                           for a, b in pairs),
            })
    return out
