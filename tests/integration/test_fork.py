"""The fork engine against real demo guests: clean clones, a parent that never notices."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host.hugepages import guest_ram, huge_share
from kvmsnap_plugin.model import BackupJob, ForkOptions, FsState, Label, ShutdownPolicy
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu


def chain_of(image: Path) -> list[tuple[str, str]]:
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                          str(image)], capture_output=True, text=True, check=True).stdout
    return [(i["filename"], i["format"]) for i in json.loads(out)]


class FrozenReader:
    """A plugin reading the frozen (crash-consistent) images while they are still frozen."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.views = []

    @hookimpl
    def kvmsnap_post_shutdown(self, fork):
        for index, disk in enumerate(fork.disks):
            self.views.append(read_disk(disk.frozen, self.scratch / f"frozen{index}.raw"))


def fork(vm, tmp_path: Path, **options):
    """Fork a demo VM (no archive targets); also return the frozen images' contents."""
    reader = FrozenReader(tmp_path)
    options.setdefault("workdir", tmp_path / "work")
    options.setdefault("keep_dir", tmp_path / "keep")
    options.setdefault("clone_console", tmp_path / "clone.log")
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(**options))
    result = backup(job, Hooks(plugin_manager([reader], entry_points=False)))
    return result, reader.views


def stopped_at(text: str) -> int:
    return int(re.search(r"KVMSNAP-WORKLOAD-STOPPED (\d+)", text).group(1))


@pytest.mark.parametrize("method", ["background-snapshot", "stop-and-copy"])
def test_clone_is_clean_and_complete_while_the_crash_view_is_not(start_demo, tmp_path,
                                                                  method):
    vm = start_demo()
    before = vm.wait_counter(10)
    result, frozen = fork(vm, tmp_path, method=method)
    assert result.method == method
    assert result.label == "clean" and result.clean
    assert [(v.disk, v.state) for v in result.verdicts] == [("vdisk0", FsState.CLEAN)]
    assert result.shutdown.reason == "guest-shutdown"
    # The clone's disk: every line written before the fork, continuous, and the marker.
    clone = read_disk(Path(result.kept[0]), tmp_path / "kept.raw")
    last = stopped_at((tmp_path / "clone.log").read_text())
    assert clone.state is FsState.CLEAN and clone.continuous
    assert len(clone.lines) == last >= before
    assert clone.marker == f"clean shutdown after line {last}"
    # The crash-consistent view of the same instant lacks the buffered lines.
    assert frozen[0].state is FsState.NEEDS_RECOVERY
    assert len(frozen[0].lines) < before and frozen[0].marker is None


def test_parent_keeps_running_and_gets_its_chain_back(start_demo, tmp_path):
    vm = start_demo()
    disk = vm.paths.disks[0]
    chain_before = chain_of(disk)
    before = vm.wait_counter(10)
    result, _ = fork(vm, tmp_path)
    assert result.pause_ms < 2000  # generous for TCG on a loaded machine; benchmarks measure
    assert vm.wait_counter(vm.counter() + 3) > before  # the parent's workload goes on
    assert chain_of(disk) == chain_before
    assert not list(disk.parent.glob("*.kvmsnap-*"))  # its overlay is gone
    assert vm.qmp.runstate() == "running"
    vm.power_off_cleanly()
    parent = read_disk(disk, tmp_path / "parent.raw")
    assert parent.state is FsState.CLEAN and parent.continuous  # no write lost, no gap
    assert len(parent.lines) == stopped_at(vm.console()) > before


def test_two_disks_are_forked_at_one_instant(start_demo, tmp_path):
    vm = start_demo(disks=2)  # one -blockdev disk, one -drive disk
    before = vm.wait_counter(8)
    result, frozen = fork(vm, tmp_path)
    assert sorted(v.disk for v in result.verdicts) == ["vdisk0", "vdisk1"]
    assert all(v.state is FsState.CLEAN for v in result.verdicts)
    views = [read_disk(Path(p), tmp_path / f"k{i}.raw") for i, p in enumerate(result.kept)]
    assert views[0].lines == views[1].lines  # matching counters on both disks
    assert views[0].continuous and len(views[0].lines) >= before
    assert [f.state for f in frozen] == [FsState.NEEDS_RECOVERY] * 2


def test_guest_ignoring_the_power_button_times_out_and_leaves_nothing(start_demo, tmp_path):
    vm = start_demo(power_button="ignore")
    disk = vm.paths.disks[0]
    chain_before = chain_of(disk)
    vm.wait_counter(5)
    policy = ShutdownPolicy(timeout=6, repress_after=3)
    with pytest.raises(VMError, match="did not shut down cleanly"):
        fork(vm, tmp_path, shutdown=policy)
    assert vm.qmp.runstate() == "running"
    assert chain_of(disk) == chain_before
    work = tmp_path / "work"  # RAM state, overlays, raw views, mounts: all gone
    assert [p for p in work.rglob("*") if not p.is_dir()] == []
    assert not (tmp_path / "keep").exists()


def test_unclean_clone_can_fall_back_to_labelled_crash_consistent_images(start_demo,
                                                                         tmp_path):
    vm = start_demo(power_button="ignore")
    vm.wait_counter(5)
    policy = ShutdownPolicy(timeout=5, repress_after=2, on_unclean="crash-consistent")
    result, _ = fork(vm, tmp_path, shutdown=policy)
    assert result.label is Label.CRASH_CONSISTENT and not result.clean
    assert result.shutdown.presses == 2 and not result.shutdown.clean
    assert [v.state for v in result.verdicts] == [FsState.NEEDS_RECOVERY]


def test_cli_fork_reports_json_and_progress(start_demo, tmp_path):
    vm = start_demo()
    vm.wait_counter(5)
    out = subprocess.run(
        [sys.executable, "-m", "kvmsnap_plugin.cli", "fork", "--qmp", str(vm.paths.backup_qmp),
         "--workdir", str(tmp_path / "work"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["clean"] is True and report["verdicts"][0]["state"] == "clean"
    assert report["method"] in ("background-snapshot", "stop-and-copy")
    assert "pressing the clone's power button" in out.stderr  # progress on stderr


def test_refuses_a_paused_vm(start_demo, tmp_path):
    vm = start_demo()
    vm.qmp.execute("stop")
    with pytest.raises(VMError, match="paused"):
        fork(vm, tmp_path)
    vm.qmp.execute("cont")


def test_refuses_unclonable_devices(start_demo, tmp_path):
    vm = start_demo(extra_args=("-object", "memory-backend-memfd,id=shm0,size=4M,share=on",
                                "-device", "ivshmem-plain,memdev=shm0,id=ivshmem0"))
    with pytest.raises(VMError, match="cannot be forked"):
        fork(vm, tmp_path)
    assert vm.qmp.runstate() == "running"


def test_refuses_a_socket_that_is_not_qmp(tmp_path):
    path = tmp_path / "not-qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.sendall(b"login: ")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(VMError, match="not a QMP socket"):
            backup(BackupJob("x", path, ForkOptions(workdir=tmp_path / "work")))
    finally:
        server.close()


def test_the_guest_agent_is_the_rung_after_the_power_button(start_demo, tmp_path):
    vm = start_demo(power_button="ignore", agent=True)
    vm.wait_counter(5)
    result, _ = fork(vm, tmp_path, shutdown=ShutdownPolicy(timeout=60, repress_after=3))
    assert result.clean and result.shutdown.reason == "guest-shutdown"
    assert result.shutdown.presses == 2 and result.shutdown.agent_asked
    clone_console = (tmp_path / "clone.log").read_text()
    assert "KVMSNAP-POWER-BUTTON-IGNORED" in clone_console
    assert "KVMSNAP-AGENT-SHUTDOWN" in clone_console


def test_huge_pages_split_by_a_fork_are_rebuilt_before_its_pause_and_after_its_snapshot(
        start_demo, tmp_path):
    vm = start_demo(fill_mib=96)  # guest RAM really in use
    first, _ = fork(vm, tmp_path, method="background-snapshot", collapse_huge_pages=False)
    assert first.clean and first.huge_pages is None and first.huge_pages_after is None
    # A background snapshot's write faults split the huge pages (each un-protects 4 KiB) ...
    assert huge_share(guest_ram(vm.pid)) < 0.5
    out = subprocess.run(
        [sys.executable, "-m", "kvmsnap_plugin.cli", "fork", "--qmp", str(vm.paths.backup_qmp),
         "--workdir", str(tmp_path / "work2"), "--method", "background-snapshot",
         "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["clean"] is True
    # ... so the next fork (the default) rebuilds them before its pause: only the ranges that
    # were (nearly) resident, so the guest's RSS grew by at most 1/8 of what was collapsed;
    before = report["huge_pages"]
    assert before["share_before"] < 0.5 and before["share_after"] > 0.8, before
    assert before["collapsed_mib"] >= 96 and before["unfinished_mib"] == 0, before
    assert before["rss_growth_kib"] <= before["collapsed_mib"] * 1024 / 8 + 4096, before
    # and, its own snapshot having split them again, once more after its RAM snapshot (in
    # the background): the next backup finds them whole and has nothing to rebuild.
    after = report["huge_pages_after"]
    assert after["share_before"] < 0.5 and after["share_after"] > 0.8, after
    assert after["collapsed_mib"] >= 96 and after["unfinished_mib"] == 0, after
    assert after["rss_growth_kib"] <= after["collapsed_mib"] * 1024 / 8 + 4096, after
    assert huge_share(guest_ram(vm.pid)) > 0.8
    assert vm.running()
