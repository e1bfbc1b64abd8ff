"""Every partition classified: what it holds, and what a backup does with it.

From what blkid says (:class:`~kvmsnap_plugin.model.ProbeInfo`): the content's signature
first (a swap signature is swap whatever the partition type says), then the partition
type (GPT GUID or MBR id) for what has no signature (BIOS boot, an extended container).

Files mode archives what it mounts. The rest is skipped by rule when it holds no files
(swap, BIOS boot, an extended container, an empty partition), skipped by the operator's
``skip_partitions``, or NOT ARCHIVED with the reason, which the run warns about (exit 1):
a backup never exits 0 with data silently missing. Image mode archives whole disks: every
partition is in the image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from kvmsnap_plugin.model import (
    ExposedFilesystem,
    FsState,
    Outcome,
    PartitionRecord,
    PartKind,
    ProbeInfo,
    SkipRule,
    Verdict,
)

log = logging.getLogger(__name__)

BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
EFI_SYSTEM_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
SWAP_GUID = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
#: what ZFS on Linux (and Solaris) types its pool partitions; MBR: Solaris
ZFS_GUID = "6a898cc3-1dd2-11b2-99a6-080020736631"
MBR_ZFS = "0xbf"
#: MBR ids (blkid writes them "0x82"): extended containers, swap, EFI system
MBR_EXTENDED = frozenset({"0x5", "0xf", "0x85"})
MBR_SWAP = "0x82"
MBR_EFI = "0xef"

#: blkid TYPEs that are not filesystems kvmsnap could mount
_SIGNATURES = {"swap": PartKind.SWAP, "LVM2_member": PartKind.LVM_PV,
               "crypto_LUKS": PartKind.LUKS, "zfs_member": PartKind.ZFS_MEMBER}
#: why what holds no files is skipped
_RULE_REASONS = {
    PartKind.SWAP: "swap holds no files",
    PartKind.BIOS_BOOT: "BIOS boot partition (the boot loader's core image) holds no files",
    PartKind.EXTENDED: "extended partition: a container, its logical partitions are listed",
    PartKind.EMPTY: "empty: no signature, zeros where one would be",
}
#: why files mode cannot read a kind that holds data (yet)
_NOT_READ = {
    PartKind.LVM_PV: "LVM physical volume: its logical volumes are read through libguestfs",
    PartKind.UNKNOWN: "no filesystem kvmsnap recognises; use image mode or --skip-partition",
    # Neither the host kernel (no zfs module) nor libguestfs' appliance (Debian's has none)
    # reads ZFS: the route is not tried, and the fix is named.
    PartKind.ZFS_MEMBER: "ZFS pool member: neither the host nor libguestfs reads ZFS; "
                         "archive the disk with --mode image, or --skip-partition "
                         "type:zfs_member and back the pool up in the guest (zfs send)",
}


def kind_of(probed: ProbeInfo) -> PartKind:
    """What a partition holds, from its signature, else its partition type."""
    part_type = probed.part_type.lower()
    if probed.type in _SIGNATURES:
        return _SIGNATURES[probed.type]
    if probed.type:
        efi = part_type in (EFI_SYSTEM_GUID, MBR_EFI)
        return PartKind.EFI_SYSTEM if efi else PartKind.FILESYSTEM
    if part_type == BIOS_BOOT_GUID:
        return PartKind.BIOS_BOOT
    if part_type in MBR_EXTENDED or probed.pttype:
        return PartKind.EXTENDED
    if part_type in (SWAP_GUID, MBR_SWAP):
        return PartKind.SWAP  # not mkswap'ed yet: still no files
    if part_type in (ZFS_GUID, MBR_ZFS) and not probed.zeroed:
        return PartKind.ZFS_MEMBER  # labels blkid did not take for a pool's: still ZFS's
    return PartKind.EMPTY if probed.zeroed else PartKind.UNKNOWN


def plan_files(fs: ExposedFilesystem, rules: Sequence[SkipRule],
               mountable: Iterable[str]) -> tuple[Outcome, str]:
    """Before mounting: ARCHIVED (mount it) or why not. ``fs.kind`` is set."""
    rule = next((r for r in rules if r.matches(fs)), None)
    if rule is not None:
        return Outcome.SKIPPED_BY_CONFIG, f"skip_partitions {rule}"
    if fs.kind in _RULE_REASONS:
        return Outcome.SKIPPED_BY_RULE, _RULE_REASONS[fs.kind]
    if fs.kind is PartKind.LUKS:  # the libguestfs route opens it when a key is named
        return Outcome.NOT_ARCHIVED, f"LUKS volume {fs.probed.uuid}: no key (luks_keys)"
    if fs.kind in _NOT_READ:
        return Outcome.NOT_ARCHIVED, _NOT_READ[fs.kind]
    if fs.fstype not in mountable:
        return Outcome.NOT_ARCHIVED, (f"{fs.fstype}: the host kernel cannot mount it; "
                                      "read through libguestfs")
    return Outcome.ARCHIVED, f"mounted read-only ({fs.fstype})"


def records(filesystems: Iterable[ExposedFilesystem],
            image_only: bool) -> list[PartitionRecord]:
    """The report's line per partition. In image mode everything is in the image (what
    files mode would have skipped by config is still said so)."""
    found = []
    for fs in filesystems:
        outcome, reason = fs.outcome, fs.reason
        if image_only and outcome is not Outcome.SKIPPED_BY_CONFIG:
            outcome, reason = Outcome.IN_IMAGE, "in the whole-disk image"
        found.append(PartitionRecord(fs.where, fs.kind, fs.fstype, fs.probed.label,
                                     outcome, reason))
    return found


def to_verdict(filesystems: Iterable[ExposedFilesystem],
               image_only: bool) -> list[ExposedFilesystem]:
    """What needs a clean-shutdown verdict: what was archived and holds files (in image
    mode, every partition that holds files; skipped ones are not archived)."""
    return [fs for fs in filesystems if fs.kind.holds_files and (
        fs.outcome is Outcome.ARCHIVED
        or (image_only and fs.outcome is not Outcome.SKIPPED_BY_CONFIG))]


def warnings(partitions: Iterable[PartitionRecord], verdicts: Iterable[Verdict]) -> list[str]:
    """One named warning per item left out or not proven clean, each logged once."""
    found = [f"{p.where} ({p.fstype or p.kind}) NOT ARCHIVED: {p.reason}"
             for p in partitions if p.warns]
    found += [f"{v.where} ({v.fstype}) archived but not proven clean: {v.detail}"
              for v in verdicts if v.state is FsState.UNKNOWN]
    for line in found:
        log.warning("%s", line)
    return found

