"""Things that go wrong around kvmsnap: each ends with a clear verdict and nothing left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import clone_pid

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.errors import KvmsnapError, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import BackupJob, ForkOptions, FsState, ShutdownPolicy
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.journal import state_dir
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu

_first_pid_of_this_test = 0


@pytest.fixture(autouse=True)
def _spawned_by_this_test():
    """Processes started before this test (other tests' session daemons) are not its."""
    global _first_pid_of_this_test
    _first_pid_of_this_test = len(process.SPAWNED_PIDS)


def run(vm, tmp_path, *plugins, workdir=None, **options):
    job = BackupJob("demo", vm.paths.backup_qmp,
                    ForkOptions(workdir=workdir or tmp_path / "work", **options))
    return backup(job, Hooks(plugin_manager(list(plugins), entry_points=False)))


def assert_nothing_left(vm, workdir: Path) -> None:
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == \
        [str(vm.paths.disks[0])]
    assert not list(vm.paths.disks[0].parent.glob("*.kvmsnap-*"))
    assert [p for p in workdir.rglob("*") if not p.is_dir()] == []
    assert str(workdir) not in Path("/proc/mounts").read_text()
    assert str(workdir) not in process.run(["losetup", "-a"], timeout=30).stdout
    assert not list(state_dir().glob("*.json"))
    alive = [pid for pid in process.SPAWNED_PIDS[_first_pid_of_this_test:]
             if process.same_process(process.identity(pid))]
    assert alive == [vm.pid]  # only the parent: no clone, no export daemon


def test_a_clone_that_crashes_gives_a_clear_verdict(start_demo, tmp_path):
    vm = start_demo(power_button="ignore")  # the clone stays up until we crash it
    vm.wait_counter(3)
    work = tmp_path / "work"

    def crash_the_clone():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pid = clone_pid(work)
            # The RAM state file goes once the clone has loaded it: kill it after that, when
            # it runs, so the verdict is about the shutdown and not about a failed load.
            if pid and not any(work.rglob("ram.state")):
                time.sleep(0.5)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=crash_the_clone)
    killer.start()
    with pytest.raises(VMError, match=r"did not shut down cleanly .*exited"):
        run(vm, tmp_path, shutdown=ShutdownPolicy(timeout=60))
    killer.join()
    assert vm.qmp.runstate() == "running"
    assert_nothing_left(vm, work)


class FillUp:
    """Fills the work directory's filesystem after kvmsnap's space check (which runs before
    the plugins' pre_backup) and before the pause: the RAM state write then fails."""

    def __init__(self, directory: Path, leave: int) -> None:
        self.filler = directory / "filler"
        self.leave = leave

    @hookimpl
    def kvmsnap_pre_backup(self):
        free = os.statvfs(self.filler.parent).f_bavail * os.statvfs(self.filler.parent).f_frsize
        with open(self.filler, "wb") as out:
            out.truncate(0)
            out.write(b"\xff" * max(0, free - self.leave))


# background-snapshot writes through kvmsnap's writer process, stop-and-copy has QEMU write
# the file itself: each way, a disk that fills during the RAM save is one clear error and the
# guest runs on. (A disk too small from the start is refused before the pause:
# test_run_safety.py.)
@pytest.mark.parametrize("method", ["background-snapshot", "stop-and-copy"])
def test_a_work_directory_that_fills_up_fails_cleanly(start_demo, tmp_path, method):
    small = tmp_path / "small"
    small.mkdir()
    process.run(["mount", "-t", "tmpfs", "-o", "size=320m", "kvmsnap-test", small], timeout=30)
    try:
        vm = start_demo(memory_mib=256, fill_mib=64)  # 64 MiB of RAM that will not fit
        with pytest.raises(KvmsnapError, match="cannot write the RAM state") as info:
            run(vm, tmp_path, FillUp(small, leave=2 << 20), workdir=small / "work",
                method=method, min_free=0)
        assert "free space" in info.value.hint
        assert vm.qmp.runstate() == "running"
        assert vm.wait_counter(vm.counter() + 3)  # the guest runs on
        (small / "filler").unlink()
        assert_nothing_left(vm, small / "work")
        vm.power_off_cleanly()
    finally:
        process.run(["umount", small], timeout=30)


class ParentShutdown:
    """The VM's owner shuts the parent down while its clone's disks are being archived."""

    def __init__(self, vm) -> None:
        self.vm = vm

    @hookimpl
    def kvmsnap_post_shutdown(self):
        self.vm.power_off_cleanly()


def test_the_parent_shut_down_during_the_backup_loses_nothing(start_demo, tmp_path):
    vm = start_demo()
    vm.wait_counter(10)
    image = vm.paths.disks[0]
    with pytest.raises(KvmsnapError):
        run(vm, tmp_path, ParentShutdown(vm))
    assert not list(image.parent.glob("*.kvmsnap-*"))  # committed offline, then deleted
    assert not list(state_dir().glob("*.json"))
    disk = read_disk(image, tmp_path / "image.raw")  # the parent's own image now holds all
    assert disk.state is FsState.CLEAN and disk.continuous
    assert disk.marker == f"clean shutdown after line {len(disk.lines)}"
    chain = subprocess.run(["qemu-img", "info", "--backing-chain", str(image)],
                           capture_output=True, text=True).stdout
    assert "backing file" not in chain


class SocketRemover:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    @hookimpl
    def kvmsnap_snapshot(self):
        self.socket.unlink()


def test_the_qmp_socket_disappearing_mid_backup_does_not_matter(start_demo, tmp_path):
    vm = start_demo()
    report = run(vm, tmp_path, SocketRemover(vm.paths.backup_qmp))
    assert report.clean  # kvmsnap holds its connection for the whole run
    assert_nothing_left(vm, tmp_path / "work")


def test_sigterm_mid_backup_unwinds_and_leaves_nothing(start_demo, tmp_path):
    vm = start_demo(power_button="ignore")  # the run waits in the shutdown ladder
    work = tmp_path / "work"
    run = subprocess.Popen([sys.executable, "-m", "kvmsnap_plugin.cli", "fork", "--qmp",
                            str(vm.paths.backup_qmp), "--workdir", str(work)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while clone_pid(work) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr
    assert clone_pid(work) is None
    assert vm.qmp.runstate() == "running"
    assert_nothing_left(vm, work)
