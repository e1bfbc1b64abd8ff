"""restic's image mode streams each disk from qemu-storage-daemon's NBD export through
nbdcopy: a broken stream must fail the archive and leave no snapshot behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

from kvmsnap_plugin.disks.expose import exposed
from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import ArchiveTarget, BackupJob
from kvmsnap_plugin.plugin.archivers import restic as restic_archiver
from kvmsnap_plugin.plugin.archivers import stream

pytestmark = pytest.mark.qemu

DISK_MIB = 384


@pytest.fixture
def random_disk(tmp_path):
    """A raw disk of random data (nothing dedups or compresses: restic reads it slowly),
    exposed read-only; yields its ExposedDisk."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as handle:
        for _ in range(DISK_MIB):
            handle.write(os.urandom(1 << 20))
    with exposed([("vdisk0", image, "raw")], tmp_path / "work", tmp_path / "root",
                 mount=False) as view:
        assert view.disks[0].nbd_uri.startswith("nbd+unix:///d0?socket=")
        yield view.disks[0]


class Producers:
    """Every nbdcopy the stream module starts (to kill one mid-stream)."""

    def __init__(self, monkeypatch):
        self.started = []
        spawn = process.spawn

        def recording_spawn(argv, **kwargs):
            proc = spawn(argv, **kwargs)
            self.started.append(proc)
            return proc

        monkeypatch.setattr(stream.process, "spawn", recording_spawn)

    def kill_first_after(self, written: int) -> threading.Thread:
        """SIGKILL the first nbdcopy once it has written ``written`` bytes into the pipe."""
        def kill() -> None:
            while not self.started or _written(self.started[0].pid) < written:
                time.sleep(0.005)
            self.started[0].send_signal(signal.SIGKILL)

        thread = threading.Thread(target=kill, daemon=True)
        thread.start()
        return thread


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def stream_into(repo, disk):
    target = ArchiveTarget("restic", "restic", "image", {"repository": str(repo)})
    program = stream.producer([disk])
    assert program is not None, "nbdcopy (libnbd-bin) is installed by `make`"
    return restic_archiver.backup_stream(restic_archiver._restic(target), target,
                                         BackupJob("demo", repo / "unused.sock"), disk,
                                         ["kvmsnap"], program)


def snapshots(repo) -> list:
    return json.loads(process.run(["restic", "-r", repo, "snapshots", "--json"],
                                  timeout=120).stdout)


def test_a_killed_producer_fails_the_archive_and_leaves_no_snapshot(random_disk, restic_repo,
                                                                     monkeypatch):
    producers = Producers(monkeypatch)
    killer = producers.kill_first_after(64 << 20)  # restic has read most of that
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="reading disk vdisk0 failed: nbdcopy killed by "
                                           "signal 9") as failure:
        stream_into(restic_repo, random_disk)
    killer.join()
    assert "nothing was archived" in failure.value.hint
    assert time.monotonic() - started < 30, "restic was ended, not waited for"
    assert snapshots(restic_repo) == []  # restic never took the cut stream for the disk's end
    assert all(p.poll() is not None for p in producers.started)


def test_a_whole_stream_is_archived_byte_for_byte(random_disk, restic_repo, tmp_path):
    result = stream_into(restic_repo, random_disk)
    assert result.bytes == DISK_MIB << 20
    restored = tmp_path / "restored.raw"
    with open(restored, "wb") as out:
        process.run(["restic", "-r", restic_repo, "dump", result.name, "/vdisk0.raw"],
                    timeout=300, stdout=out.fileno())
    assert restored.read_bytes() == (tmp_path / "disk.raw").read_bytes()


def test_restic_failing_first_reports_its_own_error(random_disk, restic_repo, monkeypatch):
    """restic dies (its repository is gone): nbdcopy then loses its reader, but the error
    is restic's, and nothing is left running."""
    producers = Producers(monkeypatch)
    shutil.rmtree(restic_repo)
    with pytest.raises(ArchiveError, match="restic: no repository at"):
        stream_into(restic_repo, random_disk)
    assert producers.started and all(p.poll() is not None for p in producers.started)
