"""A sample kvmsnap plugin: archives the clone's filesystems into a .tar.gz.

Install it next to kvmsnap (``pip install contrib/sample-plugin``) and use it from a
config file::

    [archiver.tarballs]
    type = "tarball"
    directory = "/srv/tarballs"

If KVMSNAP_TARBALL_LOG names a file, every hook call is appended to it (the tests use this
to check the order in which kvmsnap calls plugins).
"""

from __future__ import annotations

import os
import tarfile
import time
from datetime import datetime
from pathlib import Path

# A plugin imports the package root only: the marker, the errors and every record a hook
# receives or returns are there (kvmsnap's internal modules may change between versions).
from kvmsnap_plugin import ArchiveResult, hookimpl


def _log(event: str) -> None:
    path = os.environ.get("KVMSNAP_TARBALL_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(event + "\n")


@hookimpl
def kvmsnap_archiver_types():
    return {"tarball": frozenset({"directory"})}


@hookimpl
def kvmsnap_pre_backup(job, parent):
    _log(f"pre_backup {job.name} disks={len(parent.writable_disks)}")
    return os.environ.get("KVMSNAP_TARBALL_VETO") or None


@hookimpl
def kvmsnap_snapshot(fork):
    _log(f"snapshot {fork.method}")


@hookimpl
def kvmsnap_post_shutdown(exposure, label):
    _log(f"post_shutdown {label} filesystems={len(exposure.filesystems)}")


@hookimpl
def kvmsnap_archive(job, target, exposure, label):
    if target.type != "tarball":
        return None
    started = time.monotonic()
    directory = Path(target.options["directory"])
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{job.name}-{datetime.now():%Y%m%dT%H%M%S}.tar.gz"
    with tarfile.open(directory / name, "w:gz") as tar:
        for fs in exposure.filesystems:
            if fs.mountpoint:
                tar.add(fs.mountpoint, arcname=str(fs.mountpoint.relative_to(exposure.root)))
    _log(f"archive {target.name} {name}")
    size = (directory / name).stat().st_size
    return [ArchiveResult(target.name, "tarball", "files", name, str(exposure.root), size,
                          size, time.monotonic() - started)]


@hookimpl
def kvmsnap_cleanup(report, error):
    _log(f"cleanup {'ok' if report else type(error).__name__}")
