"""Records of the VM's side: the parent, the fork point, the clone and its shutdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model.defaults import REPRESS_AFTER, SHUTDOWN_TIMEOUT, OnUnclean, RamMethod


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
    #: how an image of the chain is encrypted ("luks", or qcow2's old "aes"); "" for none
    encryption: str = ""
    #: the top image is a host block device (LVM volume, zvol, mapped iSCSI/RBD, loop):
    #: the parent's overlay then cannot go beside it (see fork/engine.py)
    host_device: bool = False
    #: a firmware flash (pflash): with OVMF the UEFI variable store (boot entries, Secure
    #: Boot keys), forked with the disks but archived as a file, not mounted
    flash: bool = False


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
    #: options the operator told kvmsnap to leave out of the clone (``--clone-drop``)
    clone_drop: tuple[str, ...] = ()
    #: the options the parent's own QEMU binary accepts (None: not probed, QEMU 7.2's)
    qemu_options: QemuOptions | None = None
    #: a libvirt domain's persistent XML (inactive, no secrets): archived in the VM record
    domain_xml: str = ""

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
    #: the frozen image's (size, mtime_ns, inode) right after the fork: what proves
    #: it unchanged before an offline commit (None: the fork did not get that far)
    frozen_stamp: tuple[int, ...] | None = None

    @property
    def frozen(self) -> Path:
        return Path(self.disk.filename)

    def as_dict(self) -> dict[str, Any]:
        return {"disk": asdict(self.disk), "parent_overlay": str(self.parent_overlay),
                "overlay_node": self.overlay_node,
                "frozen_stamp": list(self.frozen_stamp) if self.frozen_stamp else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForkedDisk:
        disk = dict(data["disk"])
        disk["chain"] = tuple(disk.get("chain", ()))
        stamp = data.get("frozen_stamp")
        return cls(ParentDisk(**disk), Path(data["parent_overlay"]), data["overlay_node"],
                   tuple(stamp) if stamp else None)


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
    #: where the overlay was: "active" (the disk's top: live commit and pivot), "below"
    #: (another tool's snapshot on top of it: committed through the middle of the chain),
    #: "unused" (never the disk's layer: nothing to commit)
    layer: str = "active"


@dataclass(frozen=True)
class Collapse:
    """What re-collapsing the guest RAM's huge pages did (before the pause, or after the
    RAM snapshot)."""

    seconds: float
    share_before: float
    share_after: float
    errors: tuple[str, ...] = ()
    collapsed_mib: int = 0  # asked for: the 2 MiB ranges (nearly) fully resident
    sparse_mib: int = 0  # left alone: too few pages resident (would grow the RSS)
    unfinished_mib: int = 0  # left alone: the time budget ran out first
    rss_growth_kib: int = 0  # the guest RAM's resident size after minus before
    budget_s: float | None = None
    max_missing: int | None = None  # absent pages of 512 a collapsed range could have


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
    binary: CloneBinary | None = None  # what the clone runs: the parent's own QEMU


@dataclass(frozen=True)
class ShutdownPolicy:
    timeout: float = SHUTDOWN_TIMEOUT
    repress_after: float = REPRESS_AFTER
    on_unclean: OnUnclean = OnUnclean.FAIL
    #: before the power button, lazily force-unmount the clone's network filesystems
    #: through its guest agent (False: leave them to the guest's shutdown)
    detach_network_fs: bool = True

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
    #: the network filesystems the clone had mounted, and what was done to each
    network_mounts: tuple[NetworkMount, ...] = ()


@dataclass(frozen=True)
class QemuOptions:
    """The command-line options one QEMU binary accepts, as its ``-help`` lists them."""

    flags: frozenset[str]  # options that take no value (``-S``, ``-snapshot``)
    with_value: frozenset[str]  # options followed by a value (``-m 1G``)

    def knows(self, name: str) -> bool:
        return name in self.flags or name in self.with_value


@dataclass(frozen=True)
class CloneBinary:
    """The QEMU the clone runs: the parent's own binary (``/proc/PID/exe``), never argv[0]
    of its command line (which that process can rewrite), confined by QEMU's sandbox."""

    parent: str  # the parent's process identity (process.identity): a reused PID is refused
    path: str  # where /proc/PID/exe pointed when planned; " (deleted)" if replaced since
    version: tuple[int, int, int]  # the parent's query-version: the stream's own QEMU
    sandbox: str | None  # the clone's -sandbox value, None when it cannot have one
    confinement: str  # "sandboxed", or why not

    @property
    def replaced(self) -> bool:
        return self.path.endswith(DELETED)

    def describe(self) -> str:
        """E.g. ``/usr/bin/qemu-system-x86_64 (QEMU 7.2.22, the parent's own); sandboxed``."""
        where = (f"{self.path.removesuffix(DELETED)} (deleted: replaced on disk since the VM "
                 "started)" if self.replaced else self.path)
        version = ".".join(str(n) for n in self.version)
        return f"{where} (QEMU {version}, the parent's own); {self.confinement}"


#: what the kernel appends to /proc/PID/exe once the file was deleted or replaced
DELETED = " (deleted)"


@dataclass(frozen=True)
class NetworkMount:
    """A network filesystem mounted in the clone (from its /proc/mounts)."""

    source: str  # server:/path, //server/share
    mountpoint: str
    fstype: str  # nfs, nfs4, cifs...
    options: str
    #: "detached" (lazy, forced: the clone's unwritten data for it dropped), "left to the
    #: guest", or why it could not be detached
    outcome: str
