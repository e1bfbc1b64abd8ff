"""Loop devices and mounts: attach, find partitions, mount and unmount.

The host side of exposing a disk image (and of the test guests' builders): ``losetup -r``
(+ ``partx --add``, since some kernels' ``losetup -P`` never scans), read-only mounts that
replay no journal, and the undo of each, tolerant of what is already undone.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.host import process

#: every guest filesystem: read-only, and none of the guest's setuid binaries, device
#: nodes or programs work on the host
SAFE_OPTIONS = "ro,nosuid,nodev,noexec"
#: per filesystem type, what replays no journal (the clone's disks are never written)
#: (btrfs: "nologreplay" is the deprecated spelling of rescue=nologreplay, kernel 5.9+;
#: xfs: nouuid, as clones of one template share a UUID and may be backed up at once)
MOUNT_OPTIONS = {fstype: ",".join([SAFE_OPTIONS, *extra]) for fstype, extra in {
    "ext4": ["noload"], "ext3": ["noload"], "ext2": [], "xfs": ["norecovery", "nouuid"],
    "vfat": [],
    "btrfs": ["rescue=nologreplay"]}.items()}
#: filesystems whose data leaves this host or passes through a user-space daemon: no place
#: for the guest's RAM (keys included) unless the user says so
REMOTE_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "virtiofs", "ceph", "glusterfs",
    "lustre", "afs", "coda", "ocfs2", "gfs2", "orangefs", "beegfs", "gpfs", "davfs"})

#: the kernel writes space, tab, newline and backslash in mount points as octal escapes
_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_points(table: str | None = None) -> list[str]:
    """The mount points in a mount table (default: ``/proc/self/mounts``), unescaped."""
    if table is None:
        table = Path("/proc/self/mounts").read_text()
    return [_ESCAPE.sub(lambda m: chr(int(m[1], 8)), line.split()[1])
            for line in table.splitlines() if line.strip()]


def filesystem_type(path: Path, table: str | None = None) -> str:
    """The type of the filesystem ``path`` (or, while it does not exist, where it would be
    made) lives on, from ``/proc/self/mountinfo`` (or ``table``): "ext4", "nfs4",
    "fuse.sshfs"."""
    if table is None:
        table = Path("/proc/self/mountinfo").read_text()
    target = os.path.realpath(path)
    found, best = "", -1
    for line in table.splitlines():
        fields, _, after = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not after:
            continue
        mountpoint = _ESCAPE.sub(lambda m: chr(int(m[1], 8)), parts[4])
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= best:  # later lines are mounted on top
            found, best = after.split()[0], len(mountpoint)
    return found


def is_remote(fstype: str) -> bool:
    return fstype in REMOTE_FILESYSTEMS or fstype.split(".")[0] in ("fuse", "fuseblk")


def is_mountpoint(path: Path) -> bool:
    return str(path) in mount_points()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    top = str(path.resolve())
    found = [m for m in mount_points() if m == top or m.startswith(top.rstrip("/") + "/")]
    return sorted(found, key=len, reverse=True)


def attach_loop(image: Path, *, writable: bool = False, direct_io: bool = False) -> Path:
    """Attach ``image`` to a free loop device (read-only unless ``writable``), scanning its
    partition table. ``direct_io``: then switch the device to reading ``image`` with
    O_DIRECT, past the image's own page cache; a kernel that refuses leaves it reading
    through that cache (only speed differs: :func:`loop_direct_io` tells which it got).
    Switched after the attach, not with it: older losetup (< 2.38) attaches the device and
    then fails on ``--direct-io``, which would leave it attached unknown to the caller."""
    mode = [] if writable else ["--read-only"]
    loop = Path(process.run(["losetup", *mode, "--partscan", "--find", "--show", image],
                            timeout=60).stdout.strip())
    if direct_io:
        process.run(["losetup", "--direct-io=on", loop], timeout=60, check=False)
    return loop


def loop_direct_io(loop: Path) -> bool:
    """Whether ``loop`` reads its backing file with direct I/O."""
    try:
        return Path(f"/sys/block/{loop.name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return False


@contextlib.contextmanager
def loop_attached(image: Path, *, writable: bool = False,
                  direct_io: bool = False) -> Iterator[Path]:
    """:func:`attach_loop` for the duration of the block; always detached after."""
    loop = attach_loop(image, writable=writable, direct_io=direct_io)
    try:
        yield loop
    finally:
        detach_loop(loop)


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


def mount(source: str | Path, mountpoint: Path, fstype: str,
          options: str = "defaults") -> None:
    process.run(["mount", "-t", fstype, "-o", options, source, mountpoint], timeout=120)


def bind_mount(source: Path, mountpoint: Path) -> None:
    process.run(["mount", "--bind", source, mountpoint], timeout=60)


def mount_read_only(device: Path, mountpoint: Path, fstype: str) -> None:
    mount(device, mountpoint, fstype, MOUNT_OPTIONS[fstype])


@contextlib.contextmanager
def mounted(device: str | Path, mountpoint: Path, fstype: str,
            options: str = "defaults") -> Iterator[Path]:
    """Mount for the duration of the block (creating the mount point); :func:`unmount`
    after, first what was mounted below it meanwhile (whose mount points stay)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount(device, mountpoint, fstype, options)
    try:
        yield mountpoint
    finally:
        for target in mounts_under(mountpoint):
            unmount(Path(target), remove=False)
        unmount(mountpoint)


def unmount(mountpoint: Path, *, remove: bool = True) -> None:
    """Unmount (lazily if busy) and remove the mount point unless ``remove`` is False; a
    no-op if not mounted."""
    if is_mountpoint(mountpoint):
        try:
            process.run(["umount", mountpoint], timeout=120)
        except KvmsnapError:
            # Someone still reads it (a killed archiver?): detach lazily, never leave it.
            process.run(["umount", "-l", mountpoint], timeout=60, check=False)
    if remove:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()

