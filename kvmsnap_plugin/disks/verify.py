"""Filesystem verdicts: is a disk image cleanly shut down?

A verdict is taken per filesystem, from its on-disk state alone, without mounting it:
ext2/3/4 are clean when the superblock has no ``needs_recovery`` feature (the journal was
emptied by a clean unmount); xfs when ``xfs_logprint -t`` finds a clean log (``xfs_db``
reports the log as clean); anything else is "unknown".
"""

from __future__ import annotations

import re
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


def filesystem_state(device: Path | str, fstype: str) -> tuple[FsState, str]:
    if fstype in ("ext2", "ext3", "ext4"):
        return ext4_state(device)
    if fstype == "xfs":
        return xfs_state(device)
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
        state, detail = filesystem_state(fs.device, fs.fstype)
        found.append(Verdict(fs.disk, fs.partition, fs.fstype or "none", state, detail))
    return found
