"""Defaults, enums and QEMU migration states shared by every step."""

from __future__ import annotations

from enum import StrEnum

DEFAULT_LIBVIRT_URI = "qemu:///system"
SHUTDOWN_TIMEOUT = 300.0  # power button to a stopped clone, in all
REPRESS_AFTER = 60.0  # a second press of the power button after this long
FORK_TIMEOUT = 600.0  # the RAM snapshot, from the pause to its last byte
COMMIT_TIMEOUT = 3600.0  # committing one overlay back into its frozen image
MAX_PAUSE = 5.0  # seconds a fork may pause the VM: a longer stop-and-copy is refused
#: space left free, beyond what kvmsnap knows it will write, on each filesystem the run
#: writes to: the parent's overlays grow with every write the guest makes meanwhile
MIN_FREE = 1 << 30
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
