"""kvmsnap: fully consistent backups of running QEMU/KVM guests.

The pipeline: fork -> clone -> shutdown -> expose -> archive -> verify -> cleanup.

This package root is the plugin API: the ``hookimpl`` marker, the errors a plugin may raise,
and every record a hook receives or returns (from :mod:`kvmsnap_plugin.model`), so that a
plugin imports ``kvmsnap_plugin`` and nothing deeper. The package itself never imports it.
"""

from kvmsnap_plugin import model
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
from kvmsnap_plugin.model import *  # noqa: F403 - every record, enum and default
from kvmsnap_plugin.plugin.hookspecs import hookimpl

__version__ = model.VERSION

__all__ = [  # the model's names, then the errors and the marker
    *model.__all__,
    *(error.__name__ for error in (ArchiveError, HostError, KvmsnapError, ProcessError,
                                   SkipBackup, StepTimeout, UsageError, VMError)),
    "__version__",
    "hookimpl",
]
