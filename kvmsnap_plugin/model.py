"""The records that cross the pipeline's steps, their enums, and the defaults.

fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup: each step takes the
records of the steps before it and returns its own, all defined here. This module imports
nothing of the steps, so any step (and any plugin) can import it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.paths import DEFAULT_WORKDIR

log = logging.getLogger("kvmsnap")

# -- defaults -------------------------------------------------------------------------------
DEFAULT_LIBVIRT_URI = "qemu:///system"
SHUTDOWN_TIMEOUT = 300.0  # power button to a stopped clone, in all
REPRESS_AFTER = 60.0  # a second press of the power button after this long
FORK_TIMEOUT = 600.0  # the RAM snapshot, from the pause to its last byte
COMMIT_TIMEOUT = 3600.0  # committing one overlay back into its frozen image
DEFAULT_NAME_TEMPLATE = "{vm}-{now:%Y-%m-%dT%H:%M:%S}"
METADATA_FILE = "kvmsnap-vm.json"  # the VmRecord in every archive
VERSION = "0.1.0"


# -- enums ----------------------------------------------------------------------------------
class RamMethod(StrEnum):
    """How the RAM snapshot is taken."""

    AUTO = "auto"  # background-snapshot where the host can, else stop-and-copy
    BACKGROUND = "background-snapshot"
    STOP_AND_COPY = "stop-and-copy"
    OFFLINE = "offline"  # a shut-off VM: no RAM, no fork


class Label(StrEnum):
    """What the archived disks are."""

    CLEAN = "clean"  # the clone shut down in order
    CRASH_CONSISTENT = "crash-consistent"  # the frozen images of a labelled fallback


class Mode(StrEnum):
    FILES = "files"
    IMAGE = "image"
    BOTH = "both"

    @property
    def files(self) -> bool:
        return self in (Mode.FILES, Mode.BOTH)

    @property
    def image(self) -> bool:
        return self in (Mode.IMAGE, Mode.BOTH)


class OnUnclean(StrEnum):
    FAIL = "fail"
    CRASH_CONSISTENT = "crash-consistent"


class Phase(StrEnum):
    """Where a run is, as its journal records it."""

    PREPARING = "preparing"
    FORKING = "forking"  # the parent may be paused, its overlays may be active
    FORKED = "forked"
    SHUT_DOWN = "shut-down"
    EXPOSED = "exposed"
    MOUNTED = "mounted"  # a split backup waiting for `kvmsnap release`


class FsState(StrEnum):
    CLEAN = "clean"
    NEEDS_RECOVERY = "needs-recovery"
    UNKNOWN = "unknown"


#: QEMU migration states of a RAM snapshot that has not ended yet
MIGRATION_UNFINISHED = frozenset({"setup", "active", "device", "pre-switchover",
                                  "wait-unplug", "postcopy-active", "postcopy-paused",
                                  "postcopy-recover"})
#: ... and of one that has
MIGRATION_FAILED = frozenset({"failed", "cancelled"})
MIGRATION_ENDED = MIGRATION_FAILED | {"completed"}


# -- the parent -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParentDisk:
    """One disk of the parent, as QEMU (or libvirt) sees it at discovery time."""

    device: str  # a name for people and mount points: libvirt's target, the qdev id, ...
    node: str  # the top block node; it is the frozen node after the fork
    filename: str  # the top image file; it is the frozen image after the fork
    format: str
    virtual_size: int
    read_only: bool
    chain: tuple[str, ...]  # image files from the top down to the base


@dataclass(frozen=True)
class Parent:
    """The VM being backed up, described once at the start of a run."""

    qmp_socket: Path | None
    pid: int
    name: str
    argv: tuple[str, ...]
    qemu_version: tuple[int, int, int]
    disks: tuple[ParentDisk, ...]
    #: a shut-off VM (libvirt): its disks are consistent as they are, no fork is needed
    offline: bool = False

    @property
    def writable_disks(self) -> tuple[ParentDisk, ...]:
        return tuple(d for d in self.disks if not d.read_only)


# -- fork -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForkedDisk:
    """A parent disk split at the fork: frozen below, the parent's overlay on top."""

    disk: ParentDisk
    parent_overlay: Path  # the parent writes here until the commit
    overlay_node: str

    @property
    def frozen(self) -> Path:
        return Path(self.disk.filename)

    def as_dict(self) -> dict[str, Any]:
        return {"disk": asdict(self.disk), "parent_overlay": str(self.parent_overlay),
                "overlay_node": self.overlay_node}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForkedDisk:
        disk = dict(data["disk"])
        disk["chain"] = tuple(disk.get("chain", ()))
        return cls(ParentDisk(**disk), Path(data["parent_overlay"]), data["overlay_node"])


@dataclass(frozen=True)
class ForkPoint:
    """One instant of the parent's disks and RAM."""

    parent: Parent
    disks: tuple[ForkedDisk, ...]
    state_file: Path
    method: RamMethod
    pause_ms: float  # STOP to RESUME, by QEMU's event timestamps
    disk_snapshot_ms: float
    ram_save_s: float
    ram_bytes: int
    qemu_downtime_ms: int | None


@dataclass(frozen=True)
class Commit:
    """One parent overlay given back to its frozen image."""

    device: str
    seconds: float
    bytes: int  # what the guest wrote during the backup, as the job counted it


@dataclass(frozen=True)
class Collapse:
    """What re-collapsing the guest RAM's huge pages did before the pause."""

    seconds: float
    share_before: float
    share_after: float
    errors: tuple[str, ...] = ()


# -- clone and shutdown ---------------------------------------------------------------------
@dataclass(frozen=True)
class CloneDisk:
    device: str
    overlay: Path  # qcow2 whose backing file is the frozen image
    frozen: Path
    frozen_format: str


@dataclass(frozen=True)
class ClonePlan:
    argv: tuple[str, ...]
    disks: tuple[CloneDisk, ...]
    workdir: Path
    qmp_path: Path
    console_log: Path | None
    agent_socket: Path | None = None  # the guest agent's channel, if the VM has one


@dataclass(frozen=True)
class ShutdownPolicy:
    timeout: float = SHUTDOWN_TIMEOUT
    repress_after: float = REPRESS_AFTER
    on_unclean: OnUnclean = OnUnclean.FAIL

    def __post_init__(self) -> None:
        if self.timeout < 1:
            raise UsageError(f"shutdown timeout {self.timeout:g} s is too small",
                             "give the guest at least a few seconds, e.g. "
                             "--shutdown-timeout 120")
        try:
            object.__setattr__(self, "on_unclean", OnUnclean(self.on_unclean))
        except ValueError:
            raise UsageError(f"unknown on-unclean policy {self.on_unclean!r}",
                             "use fail or crash-consistent") from None


@dataclass(frozen=True)
class ShutdownResult:
    clean: bool
    ended_by: str  # "guest", "offline", or the ladder rung that ended the clone
    seconds: float  # from the first press to the end of the clone
    presses: int
    reason: str  # QEMU's SHUTDOWN reason, or why there was none
    agent_asked: bool = False  # the guest agent was asked to power off


# -- expose and verify ----------------------------------------------------------------------
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


# -- the job --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForkOptions:
    method: RamMethod = RamMethod.AUTO
    shutdown: ShutdownPolicy = field(default_factory=ShutdownPolicy)
    keep_dir: Path | None = None  # write the clone's disks out as standalone images here
    workdir: Path = DEFAULT_WORKDIR  # RAM state, clone overlays, mounts (0700)
    overlay_dir: Path | None = None  # the parent's temporary overlays (default: beside images)
    clone_console: Path | None = None  # capture the clone's first serial port (debugging)
    pid: int | None = None  # the QEMU process, if peer credentials cannot tell
    mount_root: Path | None = None  # where the clone's filesystems appear (default: workdir)
    #: rebuild the parent's guest RAM huge pages before the pause (see hugepages.py)
    collapse_huge_pages: bool = False

    def __post_init__(self) -> None:
        choices = [m.value for m in RamMethod if m is not RamMethod.OFFLINE]
        if self.method not in choices:
            raise UsageError(f"unknown RAM snapshot method {self.method!r}",
                             f"use one of: {', '.join(choices)}")
        object.__setattr__(self, "method", RamMethod(self.method))


@dataclass(frozen=True)
class BackupJob:
    """Everything needed to back up one VM."""

    name: str
    qmp: Path | None  # a bare QEMU's QMP socket, or None for a libvirt domain
    fork: ForkOptions = field(default_factory=ForkOptions)
    targets: tuple[ArchiveTarget, ...] = ()
    dry_run: bool = False
    domain: str | None = None  # a libvirt domain's name
    libvirt_uri: str = DEFAULT_LIBVIRT_URI

    @property
    def identity(self) -> str:
        """What names this VM across runs (the journal and lock are keyed on it)."""
        if self.domain:
            return f"libvirt:{self.libvirt_uri}:{self.domain}"
        return os.path.realpath(self.qmp or "")


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupReport:
    vm: str
    label: Label
    method: RamMethod
    pause_ms: float
    disk_snapshot_ms: float
    ram_bytes: int
    ram_save_s: float
    qemu_downtime_ms: int | None
    clone_restore_s: float
    shutdown: ShutdownResult
    verdicts: list[Verdict]
    archives: list[ArchiveResult]
    kept: list[str]
    commits: list[Commit]
    total_s: float
    warnings: list[str] = field(default_factory=list)
    huge_pages: Collapse | None = None  # with collapse_huge_pages: what re-collapsing did

    @property
    def clean(self) -> bool:
        return self.label is Label.CLEAN and all(v.clean for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data


@dataclass(frozen=True)
class Plan:
    """What a backup would do (``--dry-run``): nothing is touched to make it."""

    vm: str
    pid: int
    disks: list[dict[str, str]]
    clone_argv: list[str]
    targets: list[str]
    mount_root: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Recovery:
    """What a recovery (or a release) did, for the report."""

    vm: str
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def did(self, action: str) -> None:
        log.info("%s: %s", self.vm, action)
        self.actions.append(action)

    def failed(self, problem: str) -> None:
        log.error("%s: %s", self.vm, problem)
        self.problems.append(problem)


@dataclass(frozen=True)
class RecordedDisk:
    device: str
    image: str  # the parent's image file at backup time
    format: str
    virtual_size: int


@dataclass(frozen=True)
class VmRecord:
    """``kvmsnap-vm.json``: what an archive says about the VM it came from."""

    vm: str
    run: str  # ties together the archives and snapshots of one backup
    taken_at: str  # when this record was written, seconds after the fork; ISO 8601 UTC
    label: str  # "clean" or "crash-consistent"
    method: str
    argv: list[str]
    disks: list[RecordedDisk]
    version: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> VmRecord:
        data: dict[str, Any] = json.loads(text)
        data["disks"] = [RecordedDisk(**d) for d in data.get("disks", [])]
        return cls(**data)


# -- the journal's state --------------------------------------------------------------------
@dataclass(frozen=True)
class JournalState:
    """Everything a run records before doing it, so `kvmsnap recover` can undo it."""

    vm: str = ""
    identity: str = ""
    phase: Phase = Phase.PREPARING
    pid: int = 0  # the kvmsnap process of the run
    mount_root: str | None = None
    # the parent, per backend
    backend: str = "qmp"  # "qmp" or "libvirt"
    qmp: str | None = None
    parent: str | None = None  # PID:START of the parent's QEMU
    domain: str | None = None
    libvirt_uri: str | None = None
    uuid: str | None = None
    # what the run created
    workdir: str | None = None
    sockets: str | None = None
    overlays: tuple[ForkedDisk, ...] = ()
    clone: str | None = None  # PID:START of the clone's QEMU
    files: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    loop_files: tuple[str, ...] = ()
    loops: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    qsd: str | None = None  # PID:START of the export daemon
    version: int = 1

    def updated(self, **changes: Any) -> JournalState:
        """A copy with ``changes``; an unknown field name raises TypeError."""
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v
                                for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["overlays"] = [d.as_dict() for d in self.overlays]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JournalState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["overlays"] = tuple(ForkedDisk.from_dict(d) for d in data.get("overlays", []))
        values["phase"] = Phase(data.get("phase", Phase.PREPARING))
        return cls().updated(**values)
