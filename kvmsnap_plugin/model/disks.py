"""Records of the disks' side: what is exposed, archived and verdicted."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model.defaults import DEFAULT_NAME_TEMPLATE, FsState, Mode


@dataclass(frozen=True)
class ExposedFilesystem:
    disk: str
    partition: str  # "" for a whole-disk filesystem, else "p1", ...
    device: Path  # the read-only block device
    fstype: str
    mountpoint: Path | None  # None when the type cannot be mounted


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
