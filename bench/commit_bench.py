"""P4: how long the live commit of the parent's overlay takes, against what was written to it.

Two variants, side by side on the same VM (each backup runs one of them; their order
alternates between repetitions):

- ``qemu-io``: block-layer writes. The demo VM has an extra virtio disk ("vscratch", not
  mounted by the guest: its init mounts only ``kvmsnap.disks`` disks), and while the backup
  runs (after the fork, while the clone's disks are exposed, before the commit back) QEMU's
  HMP ``qemu-io`` writes N MiB through that device's BlockBackend, into the parent's active
  layer: the very overlay the commit then copies down. The device holds a 16 MiB ext4 (so
  the clone's disk can be exposed and verified like any other) and the writes land beyond
  it. Sequential writes of whole clusters: the best case.
- ``guest``: guest-written data. The demo guest's writer (``DemoOptions(writer=True)``)
  reads ``W <MiB> <name>`` on its third serial port and writes that many MiB of zeros to
  /mnt/vda/<name> (its data disk, ext4) with ``dd conv=fsync``, then prints
  ``KVMSNAP-WROTE``. The command is sent at the fork point (kvmsnap's ``kvmsnap_snapshot``
  hook: the parent runs again on its new overlay, the clone has not started) and the hook
  returns only once the guest reported the write done, so all of it is in the parent's
  overlay before the commit. The guest's own costs come along: the page cache, ext4
  allocation and journal (metadata the overlay also receives), virtio and qcow2 under TCG.
  Each size rewrites the same file (``dd`` truncates it first); the data disk is large
  (4 GiB) so that ext4 always finds fresh room.

Block-commit cost depends on what the overlay holds (allocated clusters), not on who wrote
them; the guest variant shows what a real guest's writes add to the overlay (journal,
metadata, 4 KiB blocks in 64 KiB clusters) and how long a guest takes to write them.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.api import backup_once
from bench.common import MIB, Settings, load_snapshot, progress, short_dir, summary
from kvmsnap_demo.builder import DemoGuest
from kvmsnap_demo.qemu_builds import QemuBuild, qemu_build
from kvmsnap_demo.vm import DemoOptions, DemoVM, demo_vm
from kvmsnap_plugin.host import process

METHOD = "background-snapshot"
SCRATCH_ID = "vscratch"
FS_MIB = 16  # the scratch disk's filesystem; writes start after it
CHUNK_MIB = 64  # one qemu-io command writes at most this much
VM_RAM_MIB = 256
GUEST_DISK_MIB = 4096  # the guest variant's data disk (vda), ext4
GUEST_DEVICE = "vdisk0"  # the demo VM's first data disk
QEMU_IO, GUEST = "qemu-io", "guest"
VARIANTS = (QEMU_IO, GUEST)


def run(settings: Settings, guest: DemoGuest, accel: str) -> dict[str, Any]:
    """All the backups, on each QEMU build of ``--qemu`` in turn (one guest at a time);
    :func:`summarise` the records afterwards."""
    builds = [qemu_build(name) for name in settings.qemu]  # fails now if one is missing
    records: list[dict[str, Any]] = []
    for build in builds:
        mine = _run_build(settings, guest, accel, build)
        records += [{**r, "qemu": build.name, "qemu_version": build.version} for r in mine]
    return {"records": records, "vm_ram_mib": VM_RAM_MIB, "method": METHOD,
            "guest_disk_mib": GUEST_DISK_MIB, "variants": list(VARIANTS),
            "qemu": {build.name: build.version for build in builds}}


def _run_build(settings: Settings, guest: DemoGuest, accel: str,
               build: QemuBuild) -> list[dict[str, Any]]:
    sizes = settings.write_mib
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="kvmsnap-bench-p4-", dir=settings.workdir_base)))
        sockets = stack.enter_context(short_dir())
        (tmp / "vm").mkdir()
        scratch = make_scratch_disk(tmp / "scratch.qcow2", FS_MIB + max(sizes) + FS_MIB)
        writer = GuestWriter(sockets / "writer.sock")
        options = DemoOptions(memory_mib=VM_RAM_MIB, disk_size_mib=GUEST_DISK_MIB, writer=True,
                              extra_args=scratch_args(scratch) + writer.qemu_args,
                              binary=build.binary)
        progress(f"P4: booting a {VM_RAM_MIB} MiB guest on QEMU {build.version} with a "
                 f"{max(sizes) + 2 * FS_MIB} MiB scratch disk and a {GUEST_DISK_MIB} MiB data "
                 "disk")
        vm = stack.enter_context(demo_vm(guest, accel, options, workdir=tmp / "vm"))
        vm.wait_ready(timeout=120)
        stack.enter_context(writer.connected(vm))
        qdev = scratch_qdev(vm)
        counter = itertools.count()
        if settings.warmup:  # the first commit also allocates the clusters in the base image
            for variant in VARIANTS:
                _one_commit(vm, qdev, writer, variant, tmp / f"fork{next(counter)}",
                            max(sizes), 0)
        for rep in range(settings.reps):
            # rotate the order, so no size always follows the same one; alternate the
            # variants' order
            shift = rep % len(sizes)
            for index, mib in enumerate(sizes[shift:] + sizes[:shift]):
                variants = VARIANTS if (rep + index) % 2 == 0 else VARIANTS[::-1]
                for variant in variants:
                    record = _one_commit(vm, qdev, writer, variant,
                                         tmp / f"fork{next(counter)}", mib, rep + 1)
                    record["rep"] = rep
                    records.append(record)
                    progress(_describe(record))
            if not vm.running():
                raise RuntimeError("the P4 demo guest died during the benchmark")
    return records


class GuestWriter:
    """The host end of the demo guest's writer (its ttyS2, a unix socket QEMU serves)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.vm: DemoVM | None = None

    @property
    def qemu_args(self) -> tuple[str, ...]:
        # ttyS1 (the ticker's port) is unused here: a null serial port keeps the numbering
        return ("-serial", "null",
                "-chardev", f"socket,id=writer,path={self.path},server=on,wait=off",
                "-serial", "chardev:writer")

    @contextlib.contextmanager
    def connected(self, vm: DemoVM):
        deadline = time.monotonic() + 30
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                sock.connect(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    raise
                time.sleep(0.05)
        sock.setblocking(False)
        self.sock, self.vm = sock, vm
        try:
            yield self
        finally:
            self.sock = None
            sock.close()

    def write(self, mib: int, name: str, timeout: float = 600.0) -> float:
        """Have the guest write ``mib`` MiB to /mnt/vda/``name`` (fsync'ed); seconds from
        the command to the guest's report."""
        assert self.sock is not None and self.vm is not None
        self._drain()  # the guest's tty echoes what we send: throw it away
        start = len(self.vm.console())
        started = time.monotonic()
        self.sock.sendall(f"W {mib} {name}\n".encode())
        self.vm.wait_console(rf"KVMSNAP-WROTE {name} {mib}\b", timeout, start=start)
        return time.monotonic() - started

    def _drain(self) -> None:
        assert self.sock is not None
        with contextlib.suppress(BlockingIOError):
            while self.sock.recv(65536):
                pass


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


def _one_commit(vm: DemoVM, qdev: str, writer: GuestWriter, variant: str, workdir: Path,
                mib: int, pattern: int) -> dict[str, Any]:
    record: dict[str, Any] = {"variant": variant, "write_mib": mib, **load_snapshot()}
    wrote: list[float] = []

    def block_writer() -> None:
        wrote.append(write_through_device(vm, qdev, mib, pattern % 256))

    def guest_writer() -> None:
        wrote.append(writer.write(mib, f"p4-{mib}"))

    device = SCRATCH_ID if variant == QEMU_IO else GUEST_DEVICE
    try:
        if variant == QEMU_IO:
            outcome = backup_once(vm.paths.backup_qmp, workdir, method=METHOD,
                                  after_shutdown=block_writer if mib else None)
        else:
            outcome = backup_once(vm.paths.backup_qmp, workdir, method=METHOD,
                                  on_snapshot=guest_writer if mib else None)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=-6)
        return record
    commit = next((c for c in outcome.commits if c.device == device), None)
    record.update(device=device, write_s=wrote[0] if wrote else 0.0,
                  pause_ms=outcome.pause_ms, total_s=outcome.total_s, clean=outcome.clean,
                  commit_s=commit.seconds if commit else None,
                  commit_bytes=commit.bytes if commit else None,
                  all_commits=[{"device": c.device, "seconds": c.seconds, "bytes": c.bytes}
                               for c in outcome.commits])
    if commit and commit.seconds > 0 and commit.bytes:
        record["commit_mib_s"] = commit.bytes / MIB / commit.seconds
    return record


def _describe(record: dict[str, Any]) -> str:
    head = f"  {record.get('variant', QEMU_IO):7s} wrote {record['write_mib']:5d} MiB: "
    if "error" in record:
        return head + "FAILED " + record["error"]
    return head + (f"commit {record['commit_s']:.3f} s for {record['commit_bytes'] / MIB:.0f} "
                   f"MiB (writes took {record['write_s']:.2f} s)")


def variant_of(record: dict[str, Any]) -> str:
    return record.get("variant", QEMU_IO)  # results from before the guest variant


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per QEMU build ("system": results from before ``--qemu``); the first build's summary
    also at the top (what one-build reports read)."""
    builds = list(dict.fromkeys(r.get("qemu", "system") for r in records)) or ["system"]
    by_qemu = {build: summarise_build([r for r in records if r.get("qemu", "system") == build])
               for build in builds}
    return {**by_qemu[builds[0]], "qemu": builds, "by_qemu": by_qemu}


def summarise_build(records: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in records if "error" not in r]
    rows = []
    fits = {}
    for variant in VARIANTS:
        mine = [r for r in good if variant_of(r) == variant]
        for mib in sorted({r["write_mib"] for r in mine}):
            rs = [r for r in mine if r["write_mib"] == mib]
            rows.append({"variant": variant, "write_mib": mib,
                         "commit_s": summary(r["commit_s"] for r in rs),
                         "commit_mib": summary(r["commit_bytes"] / MIB for r in rs
                                               if r["commit_bytes"] is not None),
                         "commit_mib_s": summary(r.get("commit_mib_s") for r in rs),
                         "write_s": summary(r["write_s"] for r in rs),
                         "write_mib_s": summary(r["write_mib"] / r["write_s"] for r in rs
                                                if r["write_mib"] and r.get("write_s")),
                         "total_s": summary(r["total_s"] for r in rs),
                         "errors": sum(1 for r in records if variant_of(r) == variant
                                       and r["write_mib"] == mib and "error" in r)})
        fits[variant] = _fit(mine)
    return {"rows": rows, "fit": fits.get(QEMU_IO), "fits": fits}


def _fit(good: list[dict[str, Any]]) -> dict[str, Any] | None:
    points = [(r["commit_bytes"] / MIB, r["commit_s"]) for r in good
              if r.get("commit_bytes") is not None and r.get("commit_s") is not None]
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = statistics.linear_regression([x for x, _ in points],
                                                    [y for _, y in points])
    return {"seconds_per_gib": slope * 1024, "fixed_s": intercept,
            "mib_per_s": 1 / slope if slope > 0 else None}
