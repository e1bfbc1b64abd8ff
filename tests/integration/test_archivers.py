"""Round trips through real borg and restic repositories, and failures that clean up."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsnap_demo.disk import read_disk
from kvmsnap_demo.testing import BORG_PASSPHRASE, RESTIC_PASSWORD
from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.host import mounts, process
from kvmsnap_plugin.model import (
    ArchiveTarget,
    BackupJob,
    ExposedDisk,
    Exposure,
    ForkOptions,
    FsState,
)
from kvmsnap_plugin.plugin.archivers import restic as restic_archiver
from kvmsnap_plugin.plugin.archivers import stream
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu


def run_backup(vm, tmp_path, *targets, plugins=()):
    job = BackupJob("demo", vm.paths.backup_qmp,
                    ForkOptions(workdir=tmp_path / "work", clone_console=tmp_path / "clone.log"),
                    tuple(targets))
    return backup(job, Hooks(plugin_manager(plugins, entry_points=False)))


def borg(*args, cwd=None):
    return process.run([process.find_program("borg", "borgbackup"), *args], timeout=300,
                       cwd=cwd).stdout


def restic(*args, cwd=None):
    return process.run(["restic", *args], timeout=300, cwd=cwd).stdout


class DiskDigest:
    """The sha256 of each exposed clone disk, read through its FUSE view before archiving:
    what an image archive must hold byte for byte; and whether its loop device reads with
    direct I/O."""

    def __init__(self):
        self.digests = {}
        self.direct_io = {}

    @hookimpl
    def kvmsnap_post_shutdown(self, exposure):
        self.digests = {d.name: sha256(d.image) for d in exposure.disks}
        self.direct_io = {d.name: mounts.loop_direct_io(d.loop) for d in exposure.disks}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def assert_clean_workload(root: Path, at_least: int):
    lines = (root / "workload.log").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)]
    assert len(lines) >= at_least
    marker = (root / "clean-shutdown").read_text().strip()
    assert marker == f"clean shutdown after line {len(lines)}"


def test_borg_files_and_image_round_trip(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    before = vm.wait_counter(10)
    clone_disk = DiskDigest()
    report = run_backup(vm, tmp_path, ArchiveTarget("borg", "borg", "both",
                                                    {"repository": str(borg_repo)}),
                        plugins=[clone_disk])
    assert report.clean
    names = [a["name"] for a in json.loads(borg("list", "--json", borg_repo))["archives"]]
    assert sorted(names) == sorted(a.name for a in report.archives)
    files = next(a for a in report.archives if a.kind == "files")
    image = next(a for a in report.archives if a.kind == "image")
    assert files.name.startswith("demo-") and files.name.endswith("-files")
    out = tmp_path / "extract"
    out.mkdir()
    borg("extract", f"{borg_repo}::{files.name}", cwd=out)
    assert_clean_workload(out / "vdisk0", before)
    borg("extract", "--sparse", f"{borg_repo}::{image.name}", cwd=out)
    disk = read_disk(out / "vdisk0.raw", out / "vdisk0.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) >= before
    assert sha256(out / "vdisk0.raw") == clone_disk.digests["vdisk0"]
    assert clone_disk.direct_io == {"vdisk0": True}  # borg read it past the FUSE page cache
    assert image.bytes == (64 << 20) + len((out / "kvmsnap-vm.json").read_bytes())
    assert json.loads((out / "kvmsnap-vm.json").read_text())["vm"] == "demo"
    assert image.stored_bytes < image.bytes  # zeros dedup away


def test_restic_files_and_image_round_trip(start_demo, tmp_path, restic_repo, monkeypatch):
    streamed = []
    start = stream.Streams.start
    monkeypatch.setattr(stream.Streams, "start",
                        lambda self, disk, hold: streamed.append(disk.name) or
                        start(self, disk, hold))
    vm = start_demo()
    before = vm.wait_counter(10)
    clone_disk = DiskDigest()
    report = run_backup(vm, tmp_path, ArchiveTarget("restic", "restic", "both",
                                                    {"repository": str(restic_repo),
                                                     "tags": ["nightly"]}),
                        plugins=[clone_disk])
    snapshots = json.loads(restic("-r", restic_repo, "snapshots", "--json"))
    assert len(snapshots) == 3  # the files, the one disk, and the VM's metadata
    assert all({"kvmsnap", "vm:demo", "nightly", "state:clean"} <= set(s["tags"])
               for s in snapshots)
    files = next(a for a in report.archives if a.kind == "files")
    out = tmp_path / "restore"
    restic("-r", restic_repo, "restore", files.name, "--target", out)
    assert_clean_workload(next(out.rglob("vdisk0")), before)
    image = next(a for a in report.archives if a.kind == "image")
    raw = tmp_path / "vdisk0.raw"
    with open(raw, "wb") as handle:
        subprocess.run(["restic", "-r", str(restic_repo), "dump", image.name, "/vdisk0.raw"],
                       stdout=handle, check=True, timeout=300)
    disk = read_disk(raw, raw)
    assert disk.state is FsState.CLEAN and len(disk.lines) >= before
    assert streamed == ["vdisk0"]  # from the NBD export, through nbdcopy
    assert image.bytes == raw.stat().st_size == 64 << 20
    assert sha256(raw) == clone_disk.digests["vdisk0"]
    # the VM record's restic run opened the repository while the disk went (restic stamps
    # a snapshot with the time its run started), and was saved after it
    record, disk_snapshot = (next(s for s in snapshots if s["paths"] == [f"/{name}"])
                             for name in ("kvmsnap-vm.json", "vdisk0.raw"))
    assert record["time"] < disk_snapshot["time"]
    assert [a.kind for a in report.archives] == ["files", "image", "metadata"]


def test_restic_leaves_no_snapshot_when_the_image_stream_breaks(tmp_path, restic_repo,
                                                                monkeypatch):
    def broken_feed(image, write_end):
        process_written = 0
        while process_written < 8 << 20:  # restic has read 8 MiB when the source fails
            process_written += __import__("os").write(write_end, b"\1" * (1 << 20))
        raise ArchiveError("reading disk image failed after 8 MiB")

    monkeypatch.setattr(restic_archiver, "_feed", broken_feed)
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 1024)
    target = ArchiveTarget("restic", "restic", "image", {"repository": str(restic_repo)})
    job = BackupJob("demo", tmp_path / "unused.sock")
    program = restic_archiver._restic(target)
    with pytest.raises(ArchiveError, match="failed after 8 MiB"):
        restic_archiver.backup_image(program, target, job, "vdisk0", image, ["kvmsnap"])
    assert json.loads(restic("-r", restic_repo, "snapshots", "--json")) == []


def image_exposure(tmp_path: Path, *extra: str) -> Exposure:
    """One disk (no NBD) and small files beside it, as the archivers see them."""
    images = tmp_path / "images"
    images.mkdir()
    for name in extra:
        (images / name).write_text('{"vm": "demo"}')
    disk = ExposedDisk("vdisk0", images / "vdisk0.raw", Path("/dev/null"), ())
    return Exposure(tmp_path / "mnt", images, [disk], list(extra))


def backup_images(restic_repo: Path, tmp_path: Path, exposure: Exposure) -> None:
    target = ArchiveTarget("restic", "restic", "image", {"repository": str(restic_repo)})
    restic_archiver.backup_images(restic_archiver._restic(target), target,
                                  BackupJob("demo", tmp_path / "unused.sock"), exposure,
                                  ["kvmsnap"])


def wait_for_a_lock(repo: Path) -> None:
    """Until a restic run holds a lock on ``repo``: it has opened the repository."""
    deadline = time.monotonic() + 60
    while not any((repo / "locks").iterdir()):
        assert time.monotonic() < deadline, "no restic run opened the repository"
        time.sleep(0.05)


def test_a_failed_disk_leaves_no_vm_record_in_restic(tmp_path, restic_repo, monkeypatch):
    """The VM record's restic run starts before the disks; a disk that fails, after the
    record's run opened the repository and read the record, must still leave no record
    (restore takes a run without one for incomplete), and no restic running."""
    def disk_failing_late(*args, **kwargs):
        wait_for_a_lock(restic_repo)
        time.sleep(1)  # the record (a few bytes, in its pipe already) is read by now
        raise ArchiveError("reading disk image vdisk0.raw failed after 8 MiB")

    monkeypatch.setattr(restic_archiver, "backup_image", disk_failing_late)
    started = len(process.SPAWNED_PIDS)
    with pytest.raises(ArchiveError, match="failed after 8 MiB"):
        backup_images(restic_repo, tmp_path, image_exposure(tmp_path, "kvmsnap-vm.json"))
    assert json.loads(restic("-r", restic_repo, "snapshots", "--json")) == []
    assert len(process.SPAWNED_PIDS) - started == 1  # the record's restic
    assert not Path(f"/proc/{process.SPAWNED_PIDS[started]}").exists()


def test_a_failed_file_run_ends_the_vm_records_run_without_a_snapshot(tmp_path, restic_repo,
                                                                      monkeypatch):
    """A UEFI guest has two files beside its disks, the variable store first: its run
    failing once the disks are saved must not leave the record's run to save the record
    later (at kvmsnap's exit its pipe would close)."""
    monkeypatch.setattr(restic_archiver, "backup_image", lambda *args, **kwargs: None)
    finish = restic_archiver._finish

    def vars_run_failing(restic, running, target, name, kind, started):
        if name == "uefi-vars.fd":
            restic.abort(running)
            raise ArchiveError("restic backup failed: Fatal: the repository went away")
        return finish(restic, running, target, name, kind, started)

    monkeypatch.setattr(restic_archiver, "_finish", vars_run_failing)
    started = len(process.SPAWNED_PIDS)
    with pytest.raises(ArchiveError, match="went away"):
        backup_images(restic_repo, tmp_path,
                      image_exposure(tmp_path, "uefi-vars.fd", "kvmsnap-vm.json"))
    time.sleep(2)  # a run left with an open pipe would still be waiting, not saved
    assert json.loads(restic("-r", restic_repo, "snapshots", "--json")) == []
    assert len(process.SPAWNED_PIDS) - started == 2
    assert not [pid for pid in process.SPAWNED_PIDS[started:] if Path(f"/proc/{pid}").exists()]


class CleanupSpy:
    def __init__(self):
        self.calls = []

    @hookimpl
    def kvmsnap_cleanup(self, report, error):
        self.calls.append((report, error))


class RepositoryThief:
    """Moves the repository away once the clone is down: borg then fails mid-backup."""

    def __init__(self, repo: Path):
        self.repo = repo

    @hookimpl
    def kvmsnap_post_shutdown(self):
        self.repo.rename(self.repo.with_name("stolen"))


def test_a_failing_archiver_still_cleans_up_everything(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    vm.wait_counter(5)
    spy = CleanupSpy()
    with pytest.raises(ArchiveError, match="no repository") as info:
        run_backup(vm, tmp_path, ArchiveTarget("borg", "borg", "files",
                                               {"repository": str(borg_repo)}),
                   plugins=[spy, RepositoryThief(borg_repo)])
    assert "borg init" in info.value.hint
    assert spy.calls == [(None, info.value)]  # the plugins' cleanup ran, with the error
    assert vm.qmp.runstate() == "running"
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == \
        [str(vm.paths.disks[0])]  # the parent is back on its own image
    assert [p for p in (tmp_path / "work").rglob("*") if not p.is_dir()] == []
    mounted = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounted
    assert str(tmp_path) not in process.run(["losetup", "-a"], timeout=30).stdout


@pytest.mark.parametrize("problem", ["missing", "wrong-passphrase", "restic-password"])
def test_repository_problems_are_found_before_the_vm_is_touched(start_demo, tmp_path,
                                                                borg_repo, restic_repo,
                                                                monkeypatch, problem):
    vm = start_demo()
    vm.qmp.events()
    if problem == "missing":
        target, message = ArchiveTarget("borg", "borg", "files", {
            "repository": str(tmp_path / "nope")}), "no repository"
    elif problem == "wrong-passphrase":
        monkeypatch.setenv("BORG_PASSPHRASE", "not the passphrase")
        target, message = ArchiveTarget("borg", "borg", "files", {
            "repository": str(borg_repo)}), "wrong passphrase"
    else:
        monkeypatch.setenv("RESTIC_PASSWORD", "not the password")
        target, message = ArchiveTarget("restic", "restic", "files", {
            "repository": str(restic_repo)}), "wrong password"
    with pytest.raises(ArchiveError, match=message):
        run_backup(vm, tmp_path, target)
    assert not [e for e in vm.qmp.events() if e.name == "STOP"]  # never paused


def test_cli_backup_keeps_secrets_out_of_output(start_demo, tmp_path, borg_repo,
                                                restic_repo):
    vm = start_demo()
    vm.wait_counter(5)
    out = subprocess.run(
        [sys.executable, "-m", "kvmsnap_plugin.cli", "--debug", "backup", "--qmp",
         str(vm.paths.backup_qmp), "--name", "demo vm; rm -rf /", "--workdir",
         str(tmp_path / "work"), "--borg", str(borg_repo), "--restic", str(restic_repo),
         "--mode", "files", "--json"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["clean"] and len(report["archives"]) == 2
    assert report["archives"][0]["name"].startswith("demo vm; rm -rf _-")  # "/" is borg's
    for secret in (BORG_PASSPHRASE, RESTIC_PASSWORD):
        assert secret not in out.stdout and secret not in out.stderr
    assert "borg" in out.stderr and "create" in out.stderr  # --debug logged the commands


def test_dry_run_describes_the_backup_and_touches_nothing(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    vm.qmp.events()
    out = subprocess.run(
        [sys.executable, "-m", "kvmsnap_plugin.cli", "backup", "--qmp",
         str(vm.paths.backup_qmp), "--name", "demo", "--borg", str(borg_repo), "--dry-run",
         "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # the VM's name is the job's (--name), as in its archives, not QEMU's -name
    assert plan["vm"] == "demo" and plan["targets"] == ["borg (borg, files)"]
    assert plan["disks"][0]["image"] == str(vm.paths.disks[0])
    assert "-incoming" in plan["clone_argv"] and "defer" in plan["clone_argv"]
    assert not [e for e in vm.qmp.events() if e.name == "STOP"]  # never paused
    assert borg("list", "--short", borg_repo).strip() == ""  # nothing archived


def test_a_borg_image_read_that_takes_seconds_has_no_warning(start_demo, tmp_path, borg_repo):
    """borg warns "file changed while we backed it up" (exit 1) when a file's ctime moves
    during its read; qemu-storage-daemon's FUSE view reports the current time, so any image
    read crossing a second boundary used to end with warnings and exit code 1. A read
    longer than one second crosses at least one boundary: the disk is sized so the read
    takes several (a 3 GiB disk was read in 1.6 s once the loop devices read ahead 4 MiB)."""
    vm = start_demo(disk_size_mib=6144)
    vm.wait_counter(5)
    report = run_backup(vm, tmp_path, ArchiveTarget("borg", "borg", "image",
                                                    {"repository": str(borg_repo)}))
    image = next(a for a in report.archives if a.kind == "image")
    assert image.seconds > 1.0, "the read must cross a second boundary"
    assert image.warnings == () and report.warnings == []
    assert image.bytes >= 6144 << 20
