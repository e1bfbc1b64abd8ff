"""P4: how long the live commit of the parent's overlay takes, against what was written to it.

The busybox demo guest writes only a few lines during a backup, and it has no knob to
write a given amount on request. So the writes are made at the block layer, through the
parent's own disk: the demo VM gets an extra virtio disk ("vscratch", not mounted by the
guest: its init mounts only ``kvmsnap.disks`` disks), and while the backup runs (after the
fork, while the clone's disks are exposed, before the commit back) QEMU's HMP ``qemu-io``
writes N MiB through that device's BlockBackend, into the parent's active layer: the very
overlay the commit then copies down. The device holds a 16 MiB ext4 (so the clone's disk
can be exposed and verified like any other) and the writes land beyond it.

Block-commit cost depends on what the overlay holds (allocated clusters), not on who wrote
them; these are sequential writes, the best case. A guest-side writer would add the
guest's own write cost and scatter (ext4 blocks of 4 KiB in 64 KiB qcow2 clusters).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.api import fork_once
from bench.common import MIB, Settings, load_snapshot, progress, summary
from kvmsnap_plugin import process
from kvmsnap_plugin.demo.builder import DemoGuest
from kvmsnap_plugin.demo.vm import DemoOptions, DemoVM, demo_vm

METHOD = "background-snapshot"
SCRATCH_ID = "vscratch"
FS_MIB = 16  # the scratch disk's filesystem; writes start after it
CHUNK_MIB = 64  # one qemu-io command writes at most this much
VM_RAM_MIB = 256


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    """All the backups; :func:`summarise` the records afterwards."""
    sizes = settings.write_mib
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="kvmsnap-bench-p4-", dir=settings.workdir_base)))
        (tmp / "vm").mkdir()
        scratch = make_scratch_disk(tmp / "scratch.qcow2", FS_MIB + max(sizes) + FS_MIB)
        options = DemoOptions(memory_mib=VM_RAM_MIB, extra_args=scratch_args(scratch))
        progress(f"P4: booting a {VM_RAM_MIB} MiB guest with a {max(sizes) + 2 * FS_MIB} MiB "
                 "scratch disk")
        vm = stack.enter_context(demo_vm(guest, accel, options, workdir=tmp / "vm"))
        vm.wait_ready(timeout=120)
        qdev = scratch_qdev(vm)
        counter = itertools.count()
        if settings.warmup:  # the first commit also allocates the clusters in the base image
            _one_commit(vm, qdev, tmp / f"fork{next(counter)}", max(sizes), 0)
        for rep in range(settings.reps):
            # rotate the order, so no size always follows the same one
            shift = rep % len(sizes)
            for mib in sizes[shift:] + sizes[:shift]:
                record = _one_commit(vm, qdev, tmp / f"fork{next(counter)}", mib, rep + 1)
                record["rep"] = rep
                records.append(record)
                progress(_describe(record))
            if not vm.running():
                raise RuntimeError("the P4 demo guest died during the benchmark")
    return {"records": records, "vm_ram_mib": VM_RAM_MIB, "method": METHOD}


def make_scratch_disk(path: Path, size_mib: int) -> Path:
    """A qcow2 disk of ``size_mib`` whose first FS_MIB hold an ext4 filesystem."""
    raw = path.with_suffix(".raw")
    try:
        with open(raw, "wb") as handle:
            handle.truncate(FS_MIB * MIB)
        process.run(["mkfs.ext4", "-q", "-F", "-L", "scratch", "-E",
                     "lazy_itable_init=0,lazy_journal_init=0", raw], timeout=120)
        process.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
                    timeout=120)
        process.run(["qemu-img", "resize", "-q", path, str(size_mib * MIB)], timeout=120)
    finally:
        raw.unlink(missing_ok=True)
    return path


def scratch_args(scratch: Path) -> tuple[str, ...]:
    return ("-blockdev", f"driver=file,filename={scratch},node-name=scratch-file",
            "-blockdev", "driver=qcow2,file=scratch-file,node-name=scratch",
            "-device", f"virtio-blk-pci,drive=scratch,id={SCRATCH_ID}")


def scratch_qdev(vm: DemoVM) -> str:
    """The QOM path of the scratch disk's virtio backend (qemu-io -d wants the device that
    holds the BlockBackend, which for virtio-blk-pci is the inner virtio device)."""
    for block in vm.qmp.execute("query-block"):
        if f"/peripheral/{SCRATCH_ID}/" in block.get("qdev", ""):
            return block["qdev"]
    raise RuntimeError("the scratch disk is missing from query-block")


def write_through_device(vm: DemoVM, qdev: str, mib: int, pattern: int) -> float:
    """Write ``mib`` MiB after the filesystem, through the device's own BlockBackend."""
    started = time.monotonic()
    for offset in range(FS_MIB, FS_MIB + mib, CHUNK_MIB):
        length = min(CHUNK_MIB, FS_MIB + mib - offset)
        out = vm.qmp.execute("human-monitor-command", {
            "command-line": f'qemu-io -d {qdev} "write -P {pattern} {offset}M {length}M"'},
            timeout=300)
        if "rror" in out or "failed" in out:
            raise RuntimeError(f"qemu-io: {out.strip()}")
    return time.monotonic() - started


def _one_commit(vm: DemoVM, qdev: str, workdir: Path, mib: int, pattern: int) -> dict[str, Any]:
    record: dict[str, Any] = {"write_mib": mib, **load_snapshot()}
    wrote: list[float] = []

    def writer() -> None:
        wrote.append(write_through_device(vm, qdev, mib, pattern % 256))

    try:
        outcome = fork_once(vm.paths.backup_qmp, METHOD, workdir, writer if mib else None)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-6)
        return record
    commit = next((c for c in outcome.commits if c.device == SCRATCH_ID), None)
    record.update(write_s=wrote[0] if wrote else 0.0, pause_ms=outcome.pause_ms,
                  total_s=outcome.total_s, clean=outcome.clean,
                  commit_s=commit.seconds if commit else None,
                  commit_bytes=commit.bytes if commit else None,
                  all_commits=[{"device": c.device, "seconds": c.seconds, "bytes": c.bytes}
                               for c in outcome.commits])
    if commit and commit.seconds > 0 and commit.bytes:
        record["commit_mib_s"] = commit.bytes / MIB / commit.seconds
    return record


def _describe(record: dict[str, Any]) -> str:
    head = f"  wrote {record['write_mib']:5d} MiB: "
    if "error" in record:
        return head + "FAILED " + record["error"]
    return head + (f"commit {record['commit_s']:.3f} s for {record['commit_bytes'] / MIB:.0f} "
                   f"MiB (writes took {record['write_s']:.2f} s)")


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in records if "error" not in r]
    rows = []
    for mib in sorted({r["write_mib"] for r in good}):
        rs = [r for r in good if r["write_mib"] == mib]
        rows.append({"write_mib": mib,
                     "commit_s": summary(r["commit_s"] for r in rs),
                     "commit_mib": summary(r["commit_bytes"] / MIB for r in rs
                                           if r["commit_bytes"] is not None),
                     "commit_mib_s": summary(r.get("commit_mib_s") for r in rs),
                     "write_s": summary(r["write_s"] for r in rs),
                     "total_s": summary(r["total_s"] for r in rs),
                     "errors": sum(1 for r in records
                                   if r["write_mib"] == mib and "error" in r)})
    fit = None
    points = [(r["commit_bytes"] / MIB, r["commit_s"]) for r in good
              if r.get("commit_bytes") is not None and r.get("commit_s") is not None]
    if len({x for x, _ in points}) >= 2:
        slope, intercept = statistics.linear_regression([x for x, _ in points],
                                                        [y for _, y in points])
        fit = {"seconds_per_gib": slope * 1024, "fixed_s": intercept,
               "mib_per_s": 1 / slope if slope > 0 else None}
    return {"rows": rows, "fit": fit}
