"""What the archivers share (plugin/archive.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsnap_plugin.model import ArchiveTarget, BackupJob
from kvmsnap_plugin.plugin.archive import reads_whole_loop_devices


@pytest.mark.parametrize(("targets", "expected"), [
    ([("borg", "image")], True),
    ([("borg", "both")], True),
    ([("restic", "files"), ("borg", "image")], True),
    ([("borg", "files")], False),  # files mode: its loop devices read through page cache
    ([("restic", "image")], False),  # restic streams images from NBD, not the loop devices
    ([], False),
])
def test_only_jobs_whose_image_archives_read_loop_devices_get_direct_io(targets, expected):
    job = BackupJob("vm", Path("/run/qmp.sock"), targets=tuple(
        ArchiveTarget(f"{kind}-{mode}", kind, mode, {"repository": "/r"})
        for kind, mode in targets))
    assert reads_whole_loop_devices(job) is expected
