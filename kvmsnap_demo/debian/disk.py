"""Read a Debian test guest's disk without booting it: each filesystem's verdict and the
workload's files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_demo.debian.recipe import (
    LAYOUT,
    MARKER,
    ROOT_WORKLOAD_DIR,
    WORKLOAD_LOG,
    Partition,
    partition_devices,
)
from kvmsnap_demo.disk import WorkloadLines
from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.host import images, mounts
from kvmsnap_plugin.model import FsState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuestFilesystem(WorkloadLines):
    """What one filesystem of a guest disk holds, read without a read-write mount."""

    name: str  # "root" or "data"
    fstype: str
    state: FsState
    detail: str
    lines: tuple[str, ...]  # the workload log
    marker: str | None  # the clean-shutdown marker, if any


def read_guest_disk(image: Path, scratch: Path) -> dict[str, GuestFilesystem]:
    """Verdict and workload files of each filesystem of a guest disk (qcow2 or raw).

    A qcow2 is first copied to a raw file in ``scratch`` (``-U``: a VM may hold it), which
    is attached read-only. ext4 is read with debugfs, never mounted; xfs is mounted
    ``ro,norecovery``, which shows what is on disk without replaying the log.

    An xfs log only turns dirty once the kernel forces it to disk (every
    ``fs.xfs.xfssyncd_centisecs``; 1 s in this guest, 30 s by default): before that a
    crash copy has a clean-looking log and simply lacks the changes. A clean verdict is
    therefore necessary, not sufficient; the ``clean-shutdown`` marker is the proof.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    raw = image if image.suffix == ".raw" else \
        images.raw_copy(image, scratch / "disk.raw", "qcow2")
    try:
        with mounts.loop_attached(raw) as loop:
            devices = partition_devices(loop)
            return {part.name: _read_filesystem(devices[part.number], part, scratch)
                    for part in LAYOUT}
    finally:
        if raw != image:
            raw.unlink(missing_ok=True)


def _read_filesystem(device: Path, part: Partition, scratch: Path) -> GuestFilesystem:
    if part.fstype == "ext4":
        state, detail = verify.ext4_state(device)
        log_text = verify.read_file(device, f"{ROOT_WORKLOAD_DIR}/{WORKLOAD_LOG}") or b""
        marker = verify.read_file(device, f"{ROOT_WORKLOAD_DIR}/{MARKER}")
    else:
        state, detail = verify.xfs_state(device)
        with mounts.mounted(device, scratch / f"mnt-{part.name}", part.fstype,
                            mounts.MOUNT_OPTIONS[part.fstype]) as mnt:
            log_text = _read_if_readable(mnt / WORKLOAD_LOG) or b""
            marker = _read_if_readable(mnt / MARKER)
    return GuestFilesystem(part.name, part.fstype, state, detail,
                           tuple(log_text.decode().splitlines()),
                           marker.decode().strip() if marker is not None else None)


def _read_if_readable(path: Path) -> bytes | None:
    """A file's bytes; None if absent or unreadable (an unreplayed log can leave a directory
    entry pointing at a free inode: that is what a crash copy looks like, not an error)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.info("%s is unreadable on this copy: %s", path.name, exc.strerror)
        return None
