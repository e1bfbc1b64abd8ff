"""Clean-shutdown verdicts for vfat, btrfs, NTFS and ext (from its first bytes), each on a
real small image made by the filesystem's own mkfs, then made dirty by hand: each dirty
state is also confirmed by the filesystem's own tool, so the offsets are not ours alone."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.model import FsState


def image(tmp_path: Path, size_mib: int, *mkfs: str) -> Path:
    path = tmp_path / "fs.img"
    with open(path, "wb") as out:
        out.truncate(size_mib << 20)
    subprocess.run([*mkfs, str(path)], check=True, capture_output=True)
    return path


def set_bits(path: Path, offset: int, bits: int, size: int = 1) -> None:
    with open(path, "r+b") as raw:
        raw.seek(offset)
        value = int.from_bytes(raw.read(size), "little") | bits
        raw.seek(offset)
        raw.write(value.to_bytes(size, "little"))


@pytest.mark.parametrize(("fat", "size", "dirty_byte"), [("16", 32, 37), ("32", 64, 65)])
def test_vfat_dirty_bit(tmp_path, fat, size, dirty_byte):
    path = image(tmp_path, size, "mkfs.vfat", "-F", fat)
    assert verify.filesystem_state(path, "vfat")[0] is FsState.CLEAN
    set_bits(path, dirty_byte, 0x01)
    state, detail = verify.filesystem_state(path, "vfat")
    assert state is FsState.NEEDS_RECOVERY, detail
    fsck = subprocess.run(["fsck.fat", "-n", str(path)], capture_output=True, text=True)
    assert "Dirty bit is set" in fsck.stdout + fsck.stderr


def test_btrfs_log_tree(tmp_path):
    path = image(tmp_path, 128, "mkfs.btrfs", "-q")
    dump = subprocess.run(["btrfs", "inspect-internal", "dump-super", str(path)],
                          capture_output=True, text=True, check=True).stdout
    assert any(line.split() == ["log_root", "0"] for line in dump.splitlines())
    assert verify.filesystem_state(path, "btrfs")[0] is FsState.CLEAN
    set_bits(path, 0x10000 + 0x60, 0x1234000, size=8)  # a log tree's root block
    state, detail = verify.filesystem_state(path, "btrfs")
    assert state is FsState.NEEDS_RECOVERY, detail
    dump = subprocess.run(["btrfs", "inspect-internal", "dump-super", "-f", str(path)],
                          capture_output=True, text=True).stdout
    assert any(line.split()[:2] == ["log_root", str(0x1234000)] for line in dump.splitlines())


def ntfs_volume_flags_offsets(path: Path) -> list[int]:
    """Where $Volume's (MFT record 3) VOLUME_INFORMATION flags are, in $MFT and $MFTMirr."""
    data = path.read_bytes()
    sector = struct.unpack_from("<H", data, 0x0B)[0]
    cluster = sector * data[0x0D]
    per_record = struct.unpack_from("<b", data, 0x40)[0]
    record_size = cluster * per_record if per_record > 0 else 1 << -per_record
    return [_flags_offset(data, struct.unpack_from("<Q", data, lcn_at)[0] * cluster
                          + 3 * record_size) for lcn_at in (0x30, 0x38)]


def _flags_offset(data: bytes, record: int) -> int:
    assert data[record:record + 4] == b"FILE"
    attribute = record + struct.unpack_from("<H", data, record + 0x14)[0]
    while struct.unpack_from("<I", data, attribute)[0] != 0x70:  # $VOLUME_INFORMATION
        attribute += struct.unpack_from("<I", data, attribute + 4)[0]
    return attribute + struct.unpack_from("<H", data, attribute + 0x14)[0] + 0x0A


def test_ntfs_dirty_flag(tmp_path):
    path = image(tmp_path, 16, "mkntfs", "-F", "-Q")
    assert verify.filesystem_state(path, "ntfs")[0] is FsState.CLEAN
    for offset in ntfs_volume_flags_offsets(path):
        set_bits(path, offset, verify.NTFS_DIRTY, size=2)
    state, detail = verify.filesystem_state(path, "ntfs")
    assert state is FsState.NEEDS_RECOVERY, detail


def test_ext4_from_its_first_bytes_as_libguestfs_reads_them(tmp_path):
    path = image(tmp_path, 16, "mkfs.ext4", "-q")
    assert verify.filesystem_state("/nonexistent", "ext4", verify.read_head(path))[0] \
        is FsState.CLEAN
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(path)], check=True,
                   capture_output=True)
    assert verify.ext4_state(path)[0] is FsState.NEEDS_RECOVERY  # dumpe2fs agrees
    state, detail = verify.filesystem_state("/nonexistent", "ext4", verify.read_head(path))
    assert state is FsState.NEEDS_RECOVERY, detail


def test_fat_and_btrfs_from_their_first_bytes_too(tmp_path):
    path = image(tmp_path, 32, "mkfs.vfat", "-F", "16")
    assert verify.filesystem_state("/nonexistent", "vfat", verify.read_head(path))[0] \
        is FsState.CLEAN
    set_bits(path, 37, 0x01)
    assert verify.filesystem_state("/nonexistent", "vfat", verify.read_head(path))[0] \
        is FsState.NEEDS_RECOVERY


@pytest.mark.parametrize("fstype", ["xfs", "ntfs", ""])
def test_what_the_first_bytes_cannot_tell_is_unknown_and_says_why(fstype):
    state, detail = verify.filesystem_state("/nonexistent", fstype, b"\0" * 1024)
    assert state is FsState.UNKNOWN
    assert "libguestfs" in detail


def test_a_head_that_is_not_the_filesystem_is_unknown():
    for fstype in ("vfat", "btrfs", "ext4"):
        assert verify.head_state(fstype, b"\0" * verify.HEAD_BYTES)[0] is FsState.UNKNOWN


def test_an_xfs_log_copied_out_of_the_appliance_reads_as_the_filesystem(tmp_path):
    """What the helper copies of an xfs inside LVM/LUKS (superblock and log, sparse) is
    enough for xfs_logprint: the same verdict as the whole filesystem's."""
    from kvmsnap_plugin.disks import guestfs_helper

    path = image(tmp_path, 300, "mkfs.xfs", "-q")

    def read(size: int, offset: int) -> bytes:
        with open(path, "rb") as raw:
            raw.seek(offset)
            return raw.read(size)

    copy = tmp_path / "log.img"
    assert guestfs_helper.xfs_log_copy(read, path.stat().st_size, str(copy)) == str(copy)
    assert copy.stat().st_size == path.stat().st_size
    assert copy.stat().st_blocks * 512 < 100 << 20  # sparse: the log and superblock only
    assert verify.xfs_state(copy) == verify.xfs_state(path) == (FsState.CLEAN,
                                                               "xfs log is clean")
    assert guestfs_helper.xfs_log_copy(lambda size, offset: b"\0" * size, 1 << 20,
                                       str(tmp_path / "none.img")) is None
