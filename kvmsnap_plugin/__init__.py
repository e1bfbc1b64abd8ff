"""kvmsnap: fully consistent backups of running QEMU/KVM guests.

The pipeline: fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup.

This package root is the plugin API: the ``hookimpl`` marker, the errors a plugin may raise,
and every record a hook receives or returns (from :mod:`kvmsnap_plugin.model`), so that a
plugin imports ``kvmsnap_plugin`` and nothing deeper. The package itself never imports it.
"""

from kvmsnap_plugin.errors import (
    ArchiveError,
    HostError,
    KvmsnapError,
    ProcessError,
    SkipBackup,
    StepTimeout,
    UsageError,
    VMError,
)
from kvmsnap_plugin.model import (
    VERSION,
    ArchiveResult,
    ArchiveTarget,
    BackupJob,
    BackupReport,
    Collapse,
    Commit,
    ExposedDisk,
    ExposedFilesystem,
    Exposure,
    ForkedDisk,
    ForkOptions,
    ForkPoint,
    FsState,
    Label,
    Mode,
    OnUnclean,
    Parent,
    ParentDisk,
    RamMethod,
    ShutdownPolicy,
    ShutdownResult,
    Verdict,
)
from kvmsnap_plugin.plugin.hookspecs import hookimpl

__version__ = VERSION

__all__ = [
    "ArchiveError",
    "ArchiveResult",
    "ArchiveTarget",
    "BackupJob",
    "BackupReport",
    "Collapse",
    "Commit",
    "ExposedDisk",
    "ExposedFilesystem",
    "Exposure",
    "ForkOptions",
    "ForkPoint",
    "ForkedDisk",
    "FsState",
    "HostError",
    "KvmsnapError",
    "Label",
    "Mode",
    "OnUnclean",
    "Parent",
    "ParentDisk",
    "ProcessError",
    "RamMethod",
    "ShutdownPolicy",
    "ShutdownResult",
    "SkipBackup",
    "StepTimeout",
    "UsageError",
    "VMError",
    "Verdict",
    "__version__",
    "hookimpl",
]
