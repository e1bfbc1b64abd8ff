"""A ZFS pool member is reported NOT ARCHIVED with its fix, and the run exits 1; never
"unknown", never a libguestfs appliance started in vain (issue #14).

Neither this host's kernel (no zfs module) nor Debian's libguestfs appliance reads ZFS, so
the test image is crafted: blkid takes a device for a ZFS pool member when its labels (at
0 and 256 KiB, and the last 512 KiB) hold at least four uberblocks, each starting with the
magic 0x00bab10c, in their uberblock arrays (128 KiB into a label, one per KiB).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmsnap_plugin.disks import classify, guestfs_route, verify
from kvmsnap_plugin.model import (
    BackupReport,
    ExposedFilesystem,
    FsState,
    Label,
    Outcome,
    PartKind,
    ProbeInfo,
    RamMethod,
    ShutdownResult,
    SkipRule,
)
from kvmsnap_plugin.run.report import warnings_of

UBERBLOCK_MAGIC = 0x00BAB10C
LABEL_UBERBLOCKS = 128 << 10  # where a label's uberblock array starts
MOUNTABLE = ("ext4", "xfs", "btrfs")


def zfs_member(path: Path, size: int = 64 << 20) -> Path:
    """A sparse file blkid probes as TYPE=zfs_member: uberblocks in the first two labels."""
    with open(path, "wb") as image:
        image.truncate(size)
        for label in (0, 256 << 10):
            for slot in range(4):
                image.seek(label + LABEL_UBERBLOCKS + slot * 1024)
                image.write(struct.pack("<QQ", UBERBLOCK_MAGIC, 5000))  # magic, version
    return path


def exposed(probed: ProbeInfo, path: Path, rules=()) -> ExposedFilesystem:
    fs = ExposedFilesystem("vdisk1", "p3", path, probed.type, None, classify.kind_of(probed),
                           probed=probed)
    outcome, reason = classify.plan_files(fs, rules, MOUNTABLE)
    return ExposedFilesystem(fs.disk, fs.partition, fs.device, fs.fstype, None, fs.kind,
                             outcome, reason, probed)


def exit_code(partitions: list[ExposedFilesystem], image_only: bool = False) -> tuple:
    """The run's exit code by cli.py's rule, and its warnings."""
    records = classify.records(partitions, image_only)
    verdicts = verify.verdicts(classify.to_verdict(partitions, image_only))
    report = BackupReport("vm", Label.CLEAN, RamMethod.BACKGROUND, 1.0, 1.0, 0, 0.0, None,
                          0.0, ShutdownResult(True, "acpi", 1.0, 1, "powered off"), verdicts,
                          [], [], [], 1.0, warnings_of(Label.CLEAN, verdicts, [], records),
                          partitions=records)
    return (0 if report.clean and not report.warnings else 1), report


def test_a_crafted_pool_member_is_named_with_its_fix_and_exits_1(tmp_path):
    probed = verify.probe(zfs_member(tmp_path / "pool.img"))
    assert probed.type == "zfs_member"  # what blkid says of the crafted labels
    fs = exposed(probed, tmp_path / "pool.img")
    assert fs.kind is PartKind.ZFS_MEMBER and fs.kind.holds_files
    assert fs.outcome is Outcome.NOT_ARCHIVED
    assert "ZFS pool member" in fs.reason and "--mode image" in fs.reason
    assert guestfs_route.helper_kind(fs, {}) is None  # no appliance booted in vain
    code, report = exit_code([fs])
    assert code == 1
    assert report.warnings == [f"vdisk1/p3 (zfs_member) NOT ARCHIVED: {fs.reason}"]
    assert report.as_dict()["partitions"][0]["kind"] == "zfs-member"


def test_the_same_bytes_without_the_magic_are_not_zfs(tmp_path):
    """The crafted image is ZFS because of its uberblocks: zeroed, it is empty."""
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"")
    with open(blank, "wb") as image:
        image.truncate(64 << 20)
    probed = verify.probe(blank)
    assert probed.type == "" and classify.kind_of(probed) is PartKind.EMPTY


def test_a_skipped_pool_member_exits_0_and_image_mode_names_it_unverdicted(tmp_path):
    probed = verify.probe(zfs_member(tmp_path / "pool.img"))
    skipped = exposed(probed, tmp_path / "pool.img", (SkipRule.parse("type:zfs_member"),))
    assert skipped.outcome is Outcome.SKIPPED_BY_CONFIG
    assert exit_code([skipped])[0] == 0
    # In image mode the pool is in the image, but nothing proves it was shut down cleanly.
    code, report = exit_code([exposed(probed, tmp_path / "pool.img")], image_only=True)
    assert code == 1 and report.verdicts[0].state is FsState.UNKNOWN
    assert report.as_dict()["partitions"][0]["outcome"] == "in-image"


@pytest.mark.parametrize(("part_type", "zeroed", "kind"), [
    (classify.ZFS_GUID, False, PartKind.ZFS_MEMBER),
    ("0xbf", False, PartKind.ZFS_MEMBER),
    (classify.ZFS_GUID, True, PartKind.EMPTY),
])
def test_a_zfs_typed_partition_blkid_found_no_pool_in(part_type, zeroed, kind):
    assert classify.kind_of(ProbeInfo(part_type=part_type, zeroed=zeroed)) is kind
