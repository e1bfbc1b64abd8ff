"""What archivers share: the mounted trees to archive, and repository paths made absolute.

An archive target is one repository of one archiver type (borg, restic, or a plugin's).
The archivers themselves are plugins implementing ``kvmsnap_archive``; the pipeline hands
them the exposed disks (see :mod:`kvmsnap_plugin.run.pipeline`). This module imports no
plugin machinery, so the built-in archivers can import it.
"""

from __future__ import annotations

from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, Exposure, Mode

#: archiver types whose image mode reads the exposure's loop devices whole (borg's
#: ``--read-special``; restic streams from NBD instead)
READS_LOOP_DEVICES = frozenset({"borg"})


def targets_of(job: BackupJob, archiver_type: str) -> list[ArchiveTarget]:
    """The job's archive targets of one archiver type: what that archiver must check."""
    return [target for target in job.targets if target.type == archiver_type]


def reads_whole_loop_devices(job: BackupJob) -> bool:
    """Whether an image archive of this job reads the loop devices whole: then they read
    with direct I/O (disks/expose.py :func:`~kvmsnap_plugin.disks.expose.read_ahead`)."""
    return any(t.type in READS_LOOP_DEVICES and Mode(t.mode).image for t in job.targets)


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
