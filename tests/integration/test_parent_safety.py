"""The parent never loses a write: unlucky but ordinary events, provoked for real.

Another tool's snapshot on top of kvmsnap's overlay mid-backup, a monitor that stops
answering during the disk snapshot, a parent restarted on its frozen image before
`kvmsnap recover`, an overlay filesystem that fills up, and the parent's migration
settings: each ends with the parent running (or told how to), and every line the guest
wrote there after a clean shutdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import kvmsnap, tmpfs

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.errors import HostError, VMError
from kvmsnap_plugin.fork.engine import open_parent, plan_fork
from kvmsnap_plugin.host import images, process
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, ForkOptions, FsState, Mode, RamMethod
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.journal import state_dir
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu


def run(vm, tmp_path: Path, *plugins, **options):
    options.setdefault("workdir", tmp_path / "work")
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(**options))
    return backup(job, Hooks(plugin_manager(list(plugins), entry_points=False)))


def chain(vm) -> list[str]:
    """The parent's disk chain, top down, as its QEMU sees it."""
    [block] = vm.qmp.execute("query-block")
    files, image = [], block["inserted"]["image"]
    while image:
        files.append(image["filename"])
        image = image.get("backing-image")
    return files


def overlays_of(vm) -> list[Path]:
    return list(vm.paths.disks[0].parent.glob("*.kvmsnap-*"))


@pytest.fixture
def recover_if_failed() -> Iterator[None]:
    """A test that dies half-way leaves a run behind: undo what it can, forget the rest, so
    the next tests start clean."""
    yield
    if list(state_dir().glob("*.json")):
        kvmsnap("recover")
        for leftover in state_dir().glob("*.json"):
            leftover.unlink()


def assert_every_line_after_a_clean_shutdown(vm, image: Path, scratch: Path,
                                             before: int) -> None:
    vm.wait_counter(vm.counter() + 2)  # the guest goes on writing
    vm.power_off_cleanly()
    disk = read_disk(image, scratch)
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) > before
    assert disk.marker == f"clean shutdown after line {len(disk.lines)}"


class GuestWriter:
    """The host end of the demo guest's writer (its ttyS2): "W <MiB> <name>" writes that
    many MiB of zeros to /mnt/vda/<name> with fsync."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return ("-serial", "null",  # ttyS1, the ticker's port, unused
                "-chardev", f"socket,id=writer,path={self.path},server=on,wait=off",
                "-serial", "chardev:writer")

    @contextlib.contextmanager
    def connected(self) -> Iterator[socket.socket]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.path))
            yield sock


# -- 1. another tool's snapshot on top of kvmsnap's overlay ----------------------------------------
class AdminSnapshot:
    """An admin takes an external snapshot of the parent's disk while the backup runs."""

    def __init__(self, vm, overlay: Path) -> None:
        self.vm = vm
        self.overlay = overlay

    @hookimpl
    def kvmsnap_post_shutdown(self):
        [block] = self.vm.qmp.execute("query-block")
        self.vm.qmp.execute("blockdev-snapshot-sync", {
            "node-name": block["inserted"]["node-name"], "snapshot-file": str(self.overlay),
            "snapshot-node-name": "admin-snapshot", "format": "qcow2"})
        self.vm.wait_counter(self.vm.counter() + 3)  # lines that only the admin's file holds


def test_a_snapshot_on_top_of_our_overlay_is_committed_through_the_middle(start_demo,
                                                                          tmp_path):
    vm = start_demo()
    image = vm.paths.disks[0]
    before = vm.wait_counter(5)
    admin = tmp_path / "admin.qcow2"
    report = run(vm, tmp_path, AdminSnapshot(vm, admin))
    assert report.clean
    assert [(c.device, c.layer) for c in report.commits] == [("vdisk0", "below")]
    # The admin's snapshot now backs onto the image itself; kvmsnap's overlay is gone.
    assert chain(vm) == [str(admin), str(image)] and not overlays_of(vm)
    assert not list(state_dir().glob("*.json"))
    assert_every_line_after_a_clean_shutdown(vm, admin, tmp_path / "after.raw", before)


# -- 2. a monitor that stops answering during the disk snapshot ------------------------------------
def test_a_disk_snapshot_without_an_answer_keeps_the_overlay_until_recover(
        start_demo, tmp_path, recover_if_failed):
    vm = start_demo()
    image = vm.paths.disks[0]
    before = vm.wait_counter(5)
    try:
        # The parent's QEMU stops (SIGSTOP) just before the disk snapshot: the transaction and
        # every question after it time out. kvmsnap cannot know whether it took.
        failed = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                         str(tmp_path / "work"),
                         env={"KVMSNAP_FAULT": "hang-parent", "KVMSNAP_TEST_QMP_TIMEOUT": "3"})
        assert failed.returncode != 0
        assert "is unknown: every file is kept" in failed.stderr, failed.stderr[-3000:]
        assert "kvmsnap recover" in failed.stderr
        [overlay] = overlays_of(vm)  # the VM may be writing to it: kept
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    # QEMU goes on. It either still runs the disk snapshot it had queued (then the VM writes
    # to the overlay the old code had deleted by now), or drops it with the closed
    # connection (QEMU 7.2 discards a closed monitor's queue): recovery asks and does either.
    time.sleep(3)
    took = chain(vm)[0] == str(overlay)
    recovered = kvmsnap("recover", "--json")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr[-3000:]
    [result] = json.loads(recovered.stdout)
    assert result["problems"] == []
    assert ("committed the parent's overlay of vdisk0 back" if took else
            f"deleted the unused overlay {overlay.name}") in result["actions"]
    assert vm.qmp.runstate() == "running"
    assert chain(vm) == [str(image)] and not overlays_of(vm)
    assert_every_line_after_a_clean_shutdown(vm, image, tmp_path / "after.raw", before)


# -- 3. a parent restarted on its frozen image before `kvmsnap recover` ----------------------------
def test_recover_refuses_to_commit_onto_an_image_the_vm_ran_on_again(start_demo, tmp_path,
                                                                     recover_if_failed):
    writer = GuestWriter(tmp_path / "writer.sock")
    vm = start_demo(writer=True, extra_args=writer.qemu_args)
    image = vm.paths.disks[0]
    vm.wait_counter(5)
    killed = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                     str(tmp_path / "work"), env={"KVMSNAP_FAULT": "archiving"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    [overlay] = overlays_of(vm)
    with writer.connected() as sock:  # writes that reach the overlay (the workload's stay
        sock.sendall(b"W 1 synced\n")  # in the guest's page cache)
        vm.wait_console(r"KVMSNAP-WROTE synced 1\b", 60)
    # The host goes down: the parent dies, and so does the export daemon kvmsnap left (it
    # reads the frozen image, and would keep a restarted VM from opening it).
    [journal] = state_dir().glob("*.json")
    os.kill(int(json.loads(journal.read_text())["qsd"].split(":")[0]), signal.SIGKILL)
    os.kill(vm.pid, signal.SIGKILL)
    vm.wait_exit(30)
    # The VM is started again from its original command line: it writes to its image.
    process.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 1M 64k", image], timeout=60)
    newer = images.raw_copy(image, tmp_path / "newer.raw", "qcow2").read_bytes()

    refused = kvmsnap("recover", "--json")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    [result] = json.loads(refused.stdout)
    [problem] = result["problems"]
    assert f"{image} changed after the fork" in problem and "overwrite newer data" in problem
    assert overlay.exists() and list(state_dir().glob("*.json"))  # both kept, journal too
    assert images.raw_copy(image, tmp_path / "still.raw", "qcow2").read_bytes() == newer
    # The owner decides the restarted VM's image wins and removes the overlay: recover ends.
    overlay.unlink()
    done = kvmsnap("recover", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["problems"] == []
    assert not list(state_dir().glob("*.json"))


# -- 4. the overlay's filesystem fills up ----------------------------------------------------------
class FillTheOverlay:
    """The guest writes more than the overlay's filesystem holds while the backup runs."""

    def __init__(self, vm, writer: socket.socket, mib: int) -> None:
        self.vm = vm
        self.writer = writer
        self.mib = mib

    @hookimpl
    def kvmsnap_post_shutdown(self):
        self.writer.sendall(f"W {self.mib} fill\n".encode())
        deadline = time.monotonic() + 120
        while self.vm.qmp.runstate() != "io-error":  # QEMU stops the guest on ENOSPC
            assert time.monotonic() < deadline, "the guest never filled its overlay"
            time.sleep(0.2)


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "small", "4m") as directory:
        yield directory


@pytest.fixture
def writing_vm(start_demo, tmp_path):
    """A demo VM that writes on request (``W MIB NAME``), and its line count before."""
    writer = GuestWriter(tmp_path / "writer.sock")
    vm = start_demo(writer=True, extra_args=writer.qemu_args)
    return vm, writer, vm.wait_counter(5)


def test_a_full_overlay_filesystem_leaves_the_parent_running_with_every_write(
        writing_vm, tmp_path, small_tmpfs):
    vm, writer, before = writing_vm
    image = vm.paths.disks[0]
    with writer.connected() as sock:
        with pytest.raises(HostError) as info:
            run(vm, tmp_path, FillTheOverlay(vm, sock, 16), overlay_dir=small_tmpfs,
                min_free=0)
        assert "stopped on an I/O error" in str(info.value), info.value.one_line()
        assert f"filesystem of {small_tmpfs}" in str(info.value)
        assert vm.qmp.runstate() == "running"  # resumed once its writes were back home
        vm.wait_console(r"KVMSNAP-WROTE fill 16\b", 60)  # the write QEMU held is done
    assert chain(vm) == [str(image)] and not list(small_tmpfs.iterdir())
    assert not list(state_dir().glob("*.json"))
    assert_every_line_after_a_clean_shutdown(vm, image, tmp_path / "after.raw", before)
    raw = images.raw_copy(image, tmp_path / "filled.raw", "qcow2")
    assert verify.read_file(raw, "/fill") == bytes(16 << 20)


class FillDuringASlowArchive:
    """An archiver that takes ten minutes (a large borg run) while the guest fills the
    parent's overlay: the run must not leave the guest stopped until it ends."""

    def __init__(self, writer: socket.socket, mib: int) -> None:
        self.writer = writer
        self.mib = mib

    @hookimpl
    def kvmsnap_archiver_types(self):
        return {"slow": frozenset()}

    @hookimpl
    def kvmsnap_archive(self, target):
        if target.type != "slow":
            return None
        self.writer.sendall(f"W {self.mib} fill\n".encode())
        time.sleep(600)
        return []


def test_a_parent_that_stops_on_enospc_mid_archive_is_resumed_within_seconds(
        writing_vm, tmp_path, small_tmpfs):
    vm, writer, before = writing_vm
    image = vm.paths.disks[0]
    job = BackupJob("demo", vm.paths.backup_qmp,
                    ForkOptions(workdir=tmp_path / "work", overlay_dir=small_tmpfs, min_free=0),
                    (ArchiveTarget("slow", "slow", Mode.FILES),))
    with writer.connected() as sock:
        started = time.monotonic()
        with pytest.raises(HostError, match="stopped on an I/O error"):
            backup(job, Hooks(plugin_manager([FillDuringASlowArchive(sock, 16)],
                                             entry_points=False)))
        assert time.monotonic() - started < 120  # not the archiver's ten minutes
        assert vm.qmp.runstate() == "running"
        vm.wait_console(r"KVMSNAP-WROTE fill 16\b", 60)  # the write QEMU held is done
    assert chain(vm) == [str(image)] and not list(small_tmpfs.iterdir())
    assert not list(state_dir().glob("*.json"))
    assert_every_line_after_a_clean_shutdown(vm, image, tmp_path / "after.raw", before)


# -- 5. migration settings, and the pause limit ----------------------------------------------------
def migration_settings(vm) -> tuple[dict, list]:
    return (vm.qmp.execute("query-migrate-parameters"),
            vm.qmp.execute("query-migrate-capabilities"))


def test_the_migration_settings_are_the_same_before_and_after_a_backup(start_demo, tmp_path):
    vm = start_demo()
    vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 << 20})
    before = migration_settings(vm)
    assert run(vm, tmp_path).clean
    assert migration_settings(vm) == before


def test_a_pause_longer_than_allowed_is_refused_before_pausing(start_demo, tmp_path):
    vm = start_demo(memory_mib=256)
    vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 << 20})
    settings = migration_settings(vm)
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(workdir=tmp_path / "work"))
    (tmp_path / "run").mkdir()
    vm.qmp.events()
    with open_parent(job) as handle:
        parent = handle.describe()
        with pytest.raises(VMError, match=r"256 MiB would pause the VM for about 1\.0 s, "
                                          r"more than the 0\.5 s allowed") as info:
            handle.fork(parent, plan_fork(parent, "max-pause", None),
                        tmp_path / "run" / "ram.state", RamMethod.STOP_AND_COPY, max_pause=0.5)
    assert "--max-pause 1" in info.value.hint
    assert "STOP" not in [e.name for e in vm.qmp.events()]  # never paused
    assert not overlays_of(vm) and not list((tmp_path / "run").iterdir())
    assert migration_settings(vm) == settings  # put back after the refusal too
