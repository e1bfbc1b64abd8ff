"""The archive step: hand the exposed disks to each configured archive target.

An archive target is one repository of one archiver type (borg, restic, or a plugin's).
The archivers themselves are plugins implementing ``kvmsnap_archive``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.model import ArchiveResult

if TYPE_CHECKING:
    from kvmsnap_plugin.model import BackupJob, Exposure
    from kvmsnap_plugin.plugin.manager import Hooks

log = logging.getLogger("kvmsnap")







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
