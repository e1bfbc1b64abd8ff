"""Filesystem verdicts: is a disk image cleanly shut down?

A verdict is taken per filesystem, from its on-disk state alone, without mounting it:
ext2/3/4 are clean when the superblock has no ``needs_recovery`` feature (the journal was
emptied by a clean unmount); xfs when ``xfs_logprint -t`` finds a clean log (``xfs_db``
reports the log as clean); vfat when its boot sector's dirty bit (set by Linux while
mounted) is clear; btrfs when its superblock names no log tree (``log_root`` 0: no fsync'ed
writes to replay); NTFS when ``ntfsinfo -m`` shows no dirty flag. Filesystems inside LVM or
LUKS, read through libguestfs, are judged from their first bytes read in its appliance
(ext, vfat, btrfs); anything else is "unknown", and named.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import FsState, ProbeInfo, Verdict

if TYPE_CHECKING:
    from kvmsnap_plugin.model import ExposedFilesystem


def probe_fstype(device: Path | str) -> str:
    """Filesystem type of a block device or image file ("" when none is recognised)."""
    return probe(device).type


#: how much of a partition without a signature is read to call it empty
ZERO_PROBE_BYTES = 1 << 20


def probe(device: Path | str) -> ProbeInfo:
    """What blkid says of a device: its signature and label, its partition entry."""
    result = process.run(["blkid", "-p", "-o", "export", device], timeout=30, check=False)
    probed = ProbeInfo.from_blkid(result.stdout)
    if probed.type or probed.pttype:
        return probed
    with open(device, "rb") as raw:
        head = raw.read(ZERO_PROBE_BYTES)
    return replace(probed, zeroed=not head.strip(b"\0"))


def ext4_superblock(device: Path | str) -> dict[str, str]:
    out = process.run(["dumpe2fs", "-h", device], timeout=60).stdout
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def ext4_state(device: Path | str) -> tuple[FsState, str]:
    features = ext4_superblock(device).get("Filesystem features", "").split()
    if "needs_recovery" in features:
        return FsState.NEEDS_RECOVERY, "ext4 journal needs recovery (not cleanly unmounted)"
    return FsState.CLEAN, "ext4 cleanly unmounted (no needs_recovery)"


def xfs_state(device: Path | str) -> tuple[FsState, str]:
    result = process.run(["xfs_logprint", "-t", device], timeout=120, check=False)
    text = result.stdout + result.stderr
    if re.search(r"log tail:.*head:", text) and "<CLEAN>" in text:
        return FsState.CLEAN, "xfs log is clean"
    if "<DIRTY>" in text:
        return FsState.NEEDS_RECOVERY, "xfs log is dirty (needs replay)"
    return FsState.UNKNOWN, "xfs log state could not be read"


def ntfs_state(device: Path | str) -> tuple[FsState, str]:
    # -f: ntfsinfo refuses a dirty volume without it (it only reads)
    result = process.run(["ntfsinfo", "-f", "-m", device], timeout=120, check=False)
    flags = re.search(r"Volume Flags:\s*0x([0-9a-fA-F]+)", result.stdout)
    if flags is None:
        return FsState.UNKNOWN, "NTFS volume flags could not be read (ntfsinfo -f -m)"
    if int(flags[1], 16) & NTFS_DIRTY:
        return FsState.NEEDS_RECOVERY, "NTFS volume is marked dirty (chkdsk would run)"
    return FsState.CLEAN, "NTFS volume is not marked dirty"


#: the NTFS $Volume flag Windows and ntfs-3g set while the volume is in use
NTFS_DIRTY = 0x0001
#: what a verdict from a filesystem's first bytes reads: ext's superblock at 1 KiB, FAT's
#: boot sector, btrfs' superblock at 64 KiB
HEAD_BYTES = 72 * 1024


def fat_state(head: bytes) -> tuple[FsState, str]:
    """The dirty bit Linux sets in the boot sector while a FAT is mounted (and clears on
    unmount): byte 37 on FAT12/16, byte 65 on FAT32 (its 16-bit FAT size is 0)."""
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return FsState.UNKNOWN, "no FAT boot sector"
    fat32 = struct.unpack_from("<H", head, 0x16)[0] == 0
    if head[65 if fat32 else 37] & 0x01:
        return FsState.NEEDS_RECOVERY, "FAT dirty bit set (not cleanly unmounted)"
    return FsState.CLEAN, "FAT dirty bit clear (cleanly unmounted)"


def btrfs_state(head: bytes) -> tuple[FsState, str]:
    """btrfs is consistent at every commit; only a log tree (fsync'ed writes since the last
    commit) is to be replayed: its root is ``log_root`` in the superblock."""
    superblock = head[0x10000:0x10000 + 0x68]
    if len(superblock) < 0x68 or superblock[0x40:0x48] != b"_BHRfS_M":
        return FsState.UNKNOWN, "no btrfs superblock"
    if struct.unpack_from("<Q", superblock, 0x60)[0]:
        return FsState.NEEDS_RECOVERY, "btrfs log tree not empty (fsync'ed writes to replay)"
    return FsState.CLEAN, "btrfs log tree empty (log_root 0)"


def ext_head_state(head: bytes) -> tuple[FsState, str]:
    """ext2/3/4 from its superblock's bytes: the incompat feature RECOVER (0x4) is
    ``needs_recovery``."""
    superblock = head[1024:2048]
    if len(superblock) < 0x64 or superblock[0x38:0x3A] != b"\x53\xef":
        return FsState.UNKNOWN, "no ext superblock"
    if struct.unpack_from("<I", superblock, 0x60)[0] & 0x4:
        return FsState.NEEDS_RECOVERY, "ext4 journal needs recovery (not cleanly unmounted)"
    return FsState.CLEAN, "ext4 cleanly unmounted (no needs_recovery)"


_HEAD_CHECKS = {"ext2": ext_head_state, "ext3": ext_head_state, "ext4": ext_head_state,
                "vfat": fat_state, "btrfs": btrfs_state}


def head_state(fstype: str, head: bytes) -> tuple[FsState, str]:
    """The verdict from a filesystem's first :data:`HEAD_BYTES` bytes (read in
    libguestfs' appliance for what the host has no device of)."""
    check = _HEAD_CHECKS.get(fstype)
    if check is None:
        return FsState.UNKNOWN, (f"no clean-shutdown check for {fstype or 'this filesystem'} "
                                 "read through libguestfs")
    return check(head)


def read_head(device: Path | str) -> bytes:
    with open(device, "rb") as raw:
        return raw.read(HEAD_BYTES)


def filesystem_state(device: Path | str, fstype: str, head: bytes = b"") -> tuple[FsState, str]:
    """The verdict, from the device, or from ``head`` when the host has no device of it."""
    if head:
        return head_state(fstype, head)
    if fstype in ("ext2", "ext3", "ext4"):
        return ext4_state(device)
    if fstype == "xfs":
        return xfs_state(device)
    if fstype == "ntfs":
        return ntfs_state(device)
    if fstype in _HEAD_CHECKS:
        return head_state(fstype, read_head(device))
    return FsState.UNKNOWN, f"no clean-shutdown check for {fstype or 'this filesystem'}"


def read_file(device: Path | str, path: str) -> bytes | None:
    """A file's content from an ext2/3/4 filesystem without mounting it (None if absent)."""
    result = process.run(["debugfs", "-R", f"cat {path}", device], timeout=120, check=False)
    if "File not found" in result.stderr or result.returncode != 0:
        return None
    return result.stdout.encode()


def verdicts(filesystems: Iterable[ExposedFilesystem]) -> list[Verdict]:
    """One verdict per filesystem the exposure found."""
    found = []
    for fs in filesystems:
        state, detail = filesystem_state(fs.device, fs.fstype, fs.head)
        found.append(Verdict(fs.disk, fs.partition, fs.fstype or "none", state, detail))
    return found
