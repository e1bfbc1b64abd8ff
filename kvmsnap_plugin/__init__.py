"""kvmsnap: fully consistent backups of running QEMU/KVM guests.

The pipeline: fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup.
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
from kvmsnap_plugin.model import VERSION
from kvmsnap_plugin.plugin.hookspecs import hookimpl

__version__ = VERSION

__all__ = [
    "ArchiveError",
    "HostError",
    "KvmsnapError",
    "ProcessError",
    "SkipBackup",
    "StepTimeout",
    "UsageError",
    "VMError",
    "__version__",
    "hookimpl",
]
