"""The archive step: hand the exposed disks to each configured archive target.

An archive target is one repository of one archiver type (borg, restic, or a plugin's).
The archivers themselves are plugins implementing ``kvmsnap_archive``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmsnap_plugin import faults
from kvmsnap_plugin.errors import ArchiveError, UsageError

if TYPE_CHECKING:
    from kvmsnap_plugin.config import BackupJob
    from kvmsnap_plugin.expose import Exposure
    from kvmsnap_plugin.plugins import Hooks

log = logging.getLogger("kvmsnap")

MODES = ("files", "image", "both")
DEFAULT_NAME_TEMPLATE = "{vm}-{now:%Y-%m-%dT%H:%M:%S}"


@dataclass(frozen=True)
class ArchiveTarget:
    name: str  # the [archiver.NAME] table, or the type for command-line targets
    type: str  # "borg", "restic", or a plugin's type
    mode: str  # "files", "image" or "both"
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


def mounted_trees(exposure: Exposure) -> list[str]:
    """The top-level directories under the mount root that hold mounted filesystems."""
    tops = {fs.mountpoint.relative_to(exposure.root).parts[0]
            for fs in exposure.filesystems if fs.mountpoint}
    if not tops:
        raise ArchiveError("the clone's disks hold no filesystem kvmsnap can mount",
                           "use --mode image to archive the raw disks instead")
    return sorted(tops) + exposure.extra_files


def absolute_repository(repository: str, base: Path) -> str:
    """A local repository path made absolute (archivers run in other directories);
    remote ones (``ssh://``, ``user@host:path``, ``sftp:...``) are left as they are."""
    head = repository.split("/", 1)[0]
    if ":" in head or not repository:
        return repository
    return str((base / repository).resolve())


def archive_all(hooks: Hooks, job: BackupJob, exposure: Exposure,
                label: str) -> list[ArchiveResult]:
    """Run every target of ``job``; the first failure stops the rest and propagates."""
    results: list[ArchiveResult] = []
    faults.point("archiving")
    for target in job.targets:
        log.info("archiving %s into %s (%s, %s)", job.name, target.name, target.type,
                 target.mode)
        results += hooks.archive(job, target, exposure, label)
    return results
