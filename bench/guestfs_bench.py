"""P5: the two ways files mode reads a filesystem, on the same ext4 image.

native: a host loop device and a read-only mount (``ro,noload``), what kvmsnap uses for
everything the host kernel can mount. libguestfs: kvmsnap's libguestfs route
(disks/guestfs_route.py: one appliance, the filesystem mounted read-only inside it, served
through FUSE and bind-mounted), what it uses for LVM, LUKS, vfat and NTFS on hosts that
cannot mount them. Each reads every file of the same tree (random data, so nothing reads
as zeros); the image's pages are in the host's page cache for both (it was just written).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MIB, Settings, progress, summary
from kvmsnap_plugin.disks import guestfs_route
from kvmsnap_plugin.host import mounts, process
from kvmsnap_plugin.model import ExposedDisk, ExposedFilesystem, Outcome

FILE_MIB = 8


def run(settings: Settings) -> dict[str, Any]:
    data_mib = 128 if settings.quick else 512
    records = []
    with tempfile.TemporaryDirectory(prefix="kvmsnap-p5-", dir=settings.workdir_base) as tmp:
        work = Path(tmp)
        image = _ext4_image(work, data_mib)
        for rep in range(1 if settings.quick else 2):
            for route in ("native", "libguestfs"):
                progress(f"P5 {route} read of {data_mib} MiB (rep {rep + 1})")
                try:
                    records.append({"route": route, "rep": rep, "data_mib": data_mib,
                                    **_measure(route, image, work)})
                except Exception as exc:  # a failed sample is recorded, the rest go on
                    records.append({"route": route, "rep": rep, "error": str(exc)})
    return {"records": records}


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    found = {}
    for route in ("native", "libguestfs"):
        ok = [r for r in records if r["route"] == route and "error" not in r]
        found[route] = {key: summary(r[key] for r in ok)
                        for key in ("open_s", "read_s", "close_s", "mib_per_s")}
    return found


def _ext4_image(work: Path, data_mib: int) -> Path:
    content = work / "content"
    content.mkdir()
    for index in range(data_mib // FILE_MIB):
        (content / f"file{index:03}.bin").write_bytes(os.urandom(FILE_MIB * MIB))
    image = work / "fs.img"
    process.run(["truncate", "-s", f"{data_mib * 5 // 4 + 64}M", image], timeout=30)
    process.run(["mkfs.ext4", "-q", "-d", content, image], timeout=600)
    return image


def _measure(route: str, image: Path, work: Path) -> dict[str, float]:
    started = time.monotonic()
    if route == "native":
        with mounts.loop_attached(image) as loop:
            mountpoint = work / "native"
            with mounts.mounted(loop, mountpoint, "ext4", mounts.MOUNT_OPTIONS["ext4"]):
                opened = time.monotonic()
                read = _read_all(mountpoint)
                read_done = time.monotonic()
        return _times(started, opened, read_done, time.monotonic(), read)
    root = work / "root"
    root.mkdir(exist_ok=True)
    fs = ExposedFilesystem("bench", "", image, "ext4", None, outcome=Outcome.NOT_ARCHIVED)
    disks, appliance = guestfs_route.route([ExposedDisk("bench", image, image, (fs,))],
                                           [("bench", image, "raw")], root, work)
    try:
        mountpoint = disks[0].filesystems[0].mountpoint
        if mountpoint is None:
            raise RuntimeError(disks[0].filesystems[0].reason)
        opened = time.monotonic()
        read = _read_all(mountpoint)
        read_done = time.monotonic()
    finally:
        guestfs_route.close(appliance)
    return _times(started, opened, read_done, time.monotonic(), read)


def _times(started: float, opened: float, read_done: float, closed: float,
           read: int) -> dict[str, float]:
    read_s = read_done - opened
    return {"open_s": opened - started, "read_s": read_s, "close_s": closed - read_done,
            "mib_per_s": read / MIB / read_s if read_s else 0.0}


def _read_all(top: Path) -> int:
    total = 0
    for path in sorted(top.rglob("*.bin")):
        with open(path, "rb") as stream:
            while chunk := stream.read(MIB):
                total += len(chunk)
    return total


def markdown(p5: dict[str, Any]) -> list[str]:
    rows = p5.get("summary", {})
    lines = ["## P5: files mode's two routes, native mount against libguestfs", "",
             "The same ext4 image read file by file: through a host loop device and a "
             "read-only mount, and through kvmsnap's libguestfs route (one appliance, FUSE).",
             "", "| route | open (s) | read (s) | close (s) | MiB/s |", "|---|---|---|---|---|"]
    for route, stats in rows.items():
        lines.append(f"| {route} | " + " | ".join(
            f"{stats[key].get('median') or 0:.2f}" for key in
            ("open_s", "read_s", "close_s", "mib_per_s")) + " |")
    return [*lines, ""]
