"""Records of the disks' side: what is exposed, archived and verdicted."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model.defaults import DEFAULT_NAME_TEMPLATE, FsState, Mode


class PartKind(StrEnum):
    """What a partition (or a whole disk without a partition table) holds."""

    FILESYSTEM = "filesystem"
    EFI_SYSTEM = "efi-system"  # a filesystem (vfat) in an EFI system partition
    SWAP = "swap"
    BIOS_BOOT = "bios-boot"  # GRUB's core image: no files
    EXTENDED = "extended"  # an MBR container of logical partitions (listed on their own)
    LVM_PV = "lvm-pv"
    LUKS = "luks"
    EMPTY = "empty"  # no signature and zeros where one would be
    UNKNOWN = "unknown"
    ZFS_MEMBER = "zfs-member"  # a device of a ZFS pool: kvmsnap has no way to read ZFS

    @property
    def holds_files(self) -> bool:
        """Whether a backup without it misses data (swap, BIOS boot... hold none)."""
        return self not in (PartKind.SWAP, PartKind.BIOS_BOOT, PartKind.EXTENDED,
                            PartKind.EMPTY)


class Outcome(StrEnum):
    """What the backup did with a partition."""

    ARCHIVED = "archived"  # mounted: its files are in files-mode archives
    IN_IMAGE = "in-image"  # image mode: the whole disk, this partition included
    SKIPPED_BY_RULE = "skipped-by-rule"  # holds no files (swap, BIOS boot, ...)
    SKIPPED_BY_CONFIG = "skipped-by-config"  # skip_partitions / --skip-partition
    NOT_ARCHIVED = "not-archived"  # holds data files mode could not read: a warning
    #: a container (LVM physical volume, LUKS holding LVM) opened: its volumes are listed
    OPENED = "opened"


@dataclass(frozen=True)
class ProbeInfo:
    """What blkid says of a partition (the fields kvmsnap classifies and matches on)."""

    type: str = ""  # TYPE: ext4, swap, LVM2_member, crypto_LUKS, ...
    label: str = ""
    uuid: str = ""
    part_type: str = ""  # PART_ENTRY_TYPE: a GPT GUID or an MBR id ("0x82")
    pttype: str = ""  # PTTYPE: a partition table inside (an extended partition's)
    zeroed: bool = False  # no signature and its first MiB all zeros

    @classmethod
    def from_blkid(cls, text: str, zeroed: bool = False) -> ProbeInfo:
        """From ``blkid -p -o export`` output (KEY=value lines)."""
        fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
        return cls(fields.get("TYPE", ""), fields.get("LABEL", ""), fields.get("UUID", ""),
                   fields.get("PART_ENTRY_TYPE", "").lower(), fields.get("PTTYPE", ""),
                   zeroed)


#: the ways to name a partition to skip: label:, uuid:, type: (GUID, MBR id, kind or
#: filesystem type) and where: (``vdisk1/p3``)
SKIP_KEYS = ("label", "uuid", "type", "where")


@dataclass(frozen=True)
class SkipRule:
    """One ``skip_partitions`` entry, e.g. ``label:SWAP`` or ``type:0x82``."""

    key: str
    value: str

    @classmethod
    def parse(cls, text: str) -> SkipRule:
        key, sep, value = str(text).partition(":")
        if not sep or key not in SKIP_KEYS or not value:
            raise UsageError(f"cannot read skip rule {text!r}",
                             "write label:NAME, uuid:UUID, type:GUID|0xNN|KIND or "
                             "where:DISK/pN")
        return cls(key, value)

    def matches(self, fs: ExposedFilesystem) -> bool:
        probed = fs.probed
        if self.key == "label":
            return probed.label == self.value
        if self.key == "uuid":
            return probed.uuid.lower() == self.value.lower()
        if self.key == "where":
            return fs.where == self.value
        return self.value.lower() in (probed.part_type, probed.type.lower(), fs.kind.value)

    def __str__(self) -> str:
        return f"{self.key}:{self.value}"


@dataclass(frozen=True)
class ExposedFilesystem:
    disk: str
    partition: str  # "" for a whole-disk filesystem, else "p1", ...
    device: Path  # the read-only block device
    fstype: str
    mountpoint: Path | None  # None when the type cannot be mounted
    #: what the partition holds and what files mode made of it (disks/classify.py)
    kind: PartKind = PartKind.FILESYSTEM
    outcome: Outcome = Outcome.ARCHIVED
    reason: str = ""
    probed: ProbeInfo = field(default_factory=ProbeInfo)
    #: "" for the host's own mount, "libguestfs" for what its appliance mounted
    route: str = ""
    #: the filesystem's first bytes, read inside the appliance, when ``device`` is none of
    #: the host's (a logical volume, an opened LUKS volume): what its verdict is taken from
    head: bytes = field(default=b"", repr=False)

    @property
    def where(self) -> str:
        return self.disk + (f"/{self.partition}" if self.partition else "")


@dataclass(frozen=True)
class PartitionRecord:
    """The report's line for one partition: what it holds, what was done with it, why."""

    where: str  # "vdisk1/p3", or "vdisk1" for a whole-disk filesystem
    kind: PartKind
    fstype: str
    label: str
    outcome: Outcome
    reason: str

    @property
    def warns(self) -> bool:
        return self.outcome is Outcome.NOT_ARCHIVED


@dataclass(frozen=True)
class ExposedDisk:
    name: str
    image: Path  # a raw, read-only view of the whole disk (a FUSE export)
    loop: Path
    filesystems: tuple[ExposedFilesystem, ...]
    #: the same disk, read-only over NBD (``nbd+unix:///EXPORT?socket=PATH``); "" if none
    nbd_uri: str = ""


@dataclass
class Exposure:
    """The clone's disks, read-only: what archivers read."""

    root: Path  # the mount root: ROOT/<disk> or ROOT/<disk>/p<N>
    images_dir: Path  # the raw views, DISK.raw
    disks: list[ExposedDisk] = field(default_factory=list)
    #: small files beside the disks (in the mount root and the images dir), e.g. the VM's
    #: metadata: archivers include them
    extra_files: list[str] = field(default_factory=list)

    @property
    def filesystems(self) -> list[ExposedFilesystem]:
        return [fs for disk in self.disks for fs in disk.filesystems]


@dataclass(frozen=True)
class Verdict:
    disk: str  # the VM's device name (e.g. "vdisk0")
    partition: str  # "" for a whole-disk filesystem, else "p1", "p2", ...
    fstype: str
    state: FsState
    detail: str

    @property
    def clean(self) -> bool:
        return self.state is FsState.CLEAN

    @property
    def where(self) -> str:
        return self.disk + (f"/{self.partition}" if self.partition else "")


# -- archive --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchiveTarget:
    name: str  # the [archiver.NAME] table, or the type for command-line targets
    type: str  # "borg", "restic", or a plugin's type
    mode: Mode
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def archive_name(self, vm: str, now: datetime, kind: str) -> str:
        """The archive name from the target's template, e.g. ``web-2026-11-25T02:00:00-files``.

        ``{vm}``, ``{now:FORMAT}`` and ``{mode}`` (files or image) may be used; without
        ``{mode}`` the kind is appended, so files and image archives never collide.
        """
        template = self.option("archive_name", DEFAULT_NAME_TEMPLATE)
        try:
            name = template.format(vm=vm, now=now, mode=kind)
        except (KeyError, ValueError, IndexError, AttributeError) as exc:
            raise UsageError(f"bad archive_name template {template!r}: {exc}",
                             "use {vm}, {mode} and {now:%Y-%m-%d...} only") from None
        return name if "{mode}" in template else f"{name}-{kind}"


@dataclass(frozen=True)
class ArchiveResult:
    target: str
    type: str
    kind: str  # "files", "image", or "metadata" (the VM's record, where stored apart)
    name: str  # archive name (borg) or snapshot id (restic)
    source: str  # what was archived: a mount tree or a disk
    bytes: int  # bytes read from the clone's disks
    stored_bytes: int | None  # new bytes in the repository (after dedup/compression)
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetFailure:
    """An archive target that got no archive in this run (the others were still tried):
    that repository has no backup of the run, so the VM's exit code is 2."""

    target: str
    type: str
    error: str  # one line, secrets masked
    fix: str
