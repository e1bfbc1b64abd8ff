"""Loop devices and mounts: attach read-only, find partitions, mount and unmount.

The host side of exposing a disk image (and of the test guests' builders): ``losetup -r``
(+ ``partx --add``, since some kernels' ``losetup -P`` never scans), read-only mounts that
replay no journal, and the undo of each, tolerant of what is already undone.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.host import process

#: read-only mount options that replay no journal (the clone's disks are never written)
MOUNT_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "ext2": "ro", "xfs": "ro,norecovery",
                 "vfat": "ro", "btrfs": "ro,nologreplay"}


def is_mountpoint(path: Path) -> bool:
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def attach_loop(image: Path) -> Path:
    out = process.run(["losetup", "--read-only", "--partscan", "--find", "--show", image],
                      timeout=60).stdout.strip()
    return Path(out)


def detach_loop(loop: Path) -> None:
    process.run(["losetup", "-d", loop], timeout=60, check=False)


def detach_loops_of(backing: Path) -> None:
    """Detach every loop device backed by ``backing`` (recovery knows files, not devices)."""
    out = process.run(["losetup", "-j", backing], timeout=30, check=False).stdout
    for line in out.splitlines():
        detach_loop(Path(line.split(":", 1)[0]))


def detach_orphaned_loop(loop: Path, backing: Path) -> None:
    """Detach ``loop`` if it still shows ``backing``, or a backing that vanished with its
    export daemon (the kernel then reports "/"): never someone else's loop device."""
    try:
        current = Path(f"/sys/block/{loop.name}/loop/backing_file").read_text().strip()
    except OSError:
        return  # not attached any more
    if current in (str(backing), "/"):
        detach_loop(loop)


def block_devices(loop: Path, timeout: float) -> list[tuple[str, Path]]:
    """The loop device's partitions ("p1", ...), or the whole device ("").

    On some kernels ``losetup --partscan`` attaches the device but never scans it; then
    ``partx --add`` creates the partition devices (detaching still removes them).
    """
    table = process.run(["partx", "--show", "--noheadings", "--output", "NR", loop],
                        timeout=30, check=False)
    numbers = [int(n) for n in table.stdout.split()] if table.returncode == 0 else []
    if not numbers:
        return [("", loop)]
    devices = [(f"p{n}", Path(f"{loop}p{n}")) for n in numbers]
    started = time.monotonic()
    asked = False
    while not all(device.exists() for _, device in devices):
        waited = time.monotonic() - started
        if not asked and waited > 0.2:
            process.run(["partx", "--add", loop], timeout=30, check=False)
            asked = True
        if waited > timeout:
            raise HostError(f"partitions of {loop} did not appear in {timeout:g} s",
                            "check that /dev is a devtmpfs and partx works")
        time.sleep(0.05)
    return devices


def mount_read_only(device: Path, mountpoint: Path, fstype: str) -> None:
    process.run(["mount", "-t", fstype, "-o", MOUNT_OPTIONS[fstype], device, mountpoint],
                timeout=120)


def unmount(mountpoint: Path) -> None:
    """Unmount (lazily if busy) and remove the mount point; a no-op if not mounted."""
    if not is_mountpoint(mountpoint):
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        return
    try:
        process.run(["umount", mountpoint], timeout=120)
    except KvmsnapError:
        # Someone still reads it (an archiver that was killed?): detach lazily, never leave it.
        process.run(["umount", "-l", mountpoint], timeout=60, check=False)
    with contextlib.suppress(OSError):
        mountpoint.rmdir()

