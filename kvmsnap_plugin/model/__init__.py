"""The records that cross the pipeline's steps, their enums, and the defaults.

fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup: each step takes the
records of the steps before it and returns its own, all defined in this package and
imported from here (``from kvmsnap_plugin.model import ForkPoint``). It imports nothing
of the steps, so any step (and any plugin) can use it.

- ``defaults``: defaults, enums, QEMU migration states
- ``vm``: the parent, the fork point, the clone and its shutdown
- ``disks``: what is exposed, archived and verdicted
- ``job``: the backup job and what a run reports
- ``journal``: what a run records before doing it
"""

from kvmsnap_plugin.model.defaults import (
    COMMIT_TIMEOUT,
    DEFAULT_LIBVIRT_URI,
    DEFAULT_NAME_TEMPLATE,
    FORK_TIMEOUT,
    MAX_PAUSE,
    METADATA_FILE,
    MIGRATION_ENDED,
    MIGRATION_FAILED,
    MIGRATION_UNFINISHED,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    VERSION,
    FsState,
    Label,
    Mode,
    OnUnclean,
    Phase,
    RamMethod,
)
from kvmsnap_plugin.model.disks import (
    ArchiveResult,
    ArchiveTarget,
    ExposedDisk,
    ExposedFilesystem,
    Exposure,
    Outcome,
    PartitionRecord,
    PartKind,
    ProbeInfo,
    SkipRule,
    TargetFailure,
    Verdict,
)
from kvmsnap_plugin.model.job import (
    BackupJob,
    BackupReport,
    ForkOptions,
    Plan,
    RecordedDisk,
    Recovery,
    RunSettings,
    VmCommands,
    VmOutcome,
    VmRecord,
)
from kvmsnap_plugin.model.journal import (
    JournalState,
)
from kvmsnap_plugin.model.vm import (
    CloneBinary,
    CloneDisk,
    ClonePlan,
    Collapse,
    Commit,
    ForkedDisk,
    ForkPoint,
    NetworkMount,
    Parent,
    ParentDisk,
    QemuOptions,
    ShutdownPolicy,
    ShutdownResult,
)

__all__ = [
    "COMMIT_TIMEOUT",
    "DEFAULT_LIBVIRT_URI",
    "DEFAULT_NAME_TEMPLATE",
    "FORK_TIMEOUT",
    "MAX_PAUSE",
    "METADATA_FILE",
    "MIGRATION_ENDED",
    "MIGRATION_FAILED",
    "MIGRATION_UNFINISHED",
    "MIN_FREE",
    "REPRESS_AFTER",
    "SHUTDOWN_TIMEOUT",
    "VERSION",
    "ArchiveResult",
    "ArchiveTarget",
    "BackupJob",
    "BackupReport",
    "CloneBinary",
    "CloneDisk",
    "ClonePlan",
    "Collapse",
    "Commit",
    "ExposedDisk",
    "ExposedFilesystem",
    "Exposure",
    "ForkOptions",
    "ForkPoint",
    "ForkedDisk",
    "FsState",
    "JournalState",
    "Label",
    "Mode",
    "NetworkMount",
    "OnUnclean",
    "Outcome",
    "Parent",
    "ParentDisk",
    "PartKind",
    "PartitionRecord",
    "Phase",
    "Plan",
    "ProbeInfo",
    "QemuOptions",
    "RamMethod",
    "RecordedDisk",
    "Recovery",
    "RunSettings",
    "ShutdownPolicy",
    "ShutdownResult",
    "SkipRule",
    "TargetFailure",
    "Verdict",
    "VmCommands",
    "VmOutcome",
    "VmRecord",
]
