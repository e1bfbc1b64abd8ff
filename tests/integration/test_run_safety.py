"""Around the fork, for real: refused before the pause when the host cannot hold the run,
the clone as the OOM killer's first choice, journals and locks that keep runs apart and
never pull a mounted backup from under its reader."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, clone_pid, kvmsnap, tmpfs

from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import BackupJob, ForkOptions, OnUnclean, ShutdownPolicy
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.journal import read_state, state_dir
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu


def stops(vm) -> int:
    return len([e for e in vm.qmp.events() if e.name == "STOP"])


def chain(vm) -> list[str]:
    return [b["inserted"]["file"] for b in vm.qmp.execute("query-block")]


def journals() -> list[Path]:
    return sorted(state_dir().glob("*.json"))


def mounted(path: Path) -> bool:
    return str(path) in Path("/proc/mounts").read_text()


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "small", "16m") as directory:
        yield directory


# -- room before the pause ------------------------------------------------------------------
def test_a_work_directory_too_small_for_the_ram_is_refused_before_the_pause(start_demo,
                                                                             small_tmpfs):
    vm = start_demo()  # 256 MiB of RAM; the tmpfs holds 16
    before_chain, counter = chain(vm), vm.wait_counter(3)
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                   str(small_tmpfs / "work"))
    line = assert_one_line_error(done, f"not enough free space in {small_tmpfs / 'work'}",
                                 "the RAM state", "256 MiB + the 1 GiB margin",
                                 "the VM was not paused", "--workdir")
    assert "16 MiB free" in line
    assert stops(vm) == 0  # the parent never stopped
    assert vm.wait_counter(counter + 3) and vm.qmp.runstate() == "running"
    assert chain(vm) == before_chain
    assert list(small_tmpfs.iterdir()) == []  # not even the work directory was made
    assert not list(vm.paths.disks[0].parent.glob("*.kvmsnap-*")) and journals() == []


# -- the clone goes first when memory runs out ----------------------------------------------


def test_the_clone_is_the_oom_killers_first_choice_and_the_parent_is_not(start_demo,
                                                                          tmp_path):
    vm = start_demo(power_button="ignore")  # the clone stays up for the whole ladder
    parent_score = Path(f"/proc/{vm.pid}/oom_score_adj").read_text()
    work, seen = tmp_path / "work", []

    def watch_the_clone() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not seen:
            pid = clone_pid(work)
            if pid:
                try:
                    score = Path(f"/proc/{pid}/oom_score_adj").read_text().strip()
                except OSError:
                    continue
                if score == "1000":
                    seen.append((pid, score))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_the_clone)
    watcher.start()
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(
        workdir=work, shutdown=ShutdownPolicy(timeout=6, repress_after=3,
                                              on_unclean=OnUnclean.CRASH_CONSISTENT)))
    try:
        report = backup(job, Hooks(plugin_manager([], entry_points=False)))
    finally:
        watcher.join()
    assert seen and seen[0][1] == "1000", "the running clone never had oom_score_adj 1000"
    assert report.label == "crash-consistent"  # it ignored its power button, as planned
    assert Path(f"/proc/{vm.pid}/oom_score_adj").read_text() == parent_score
    assert vm.qmp.runstate() == "running"


# -- journals -------------------------------------------------------------------------------
def test_a_corrupt_journal_is_set_aside_and_the_good_one_next_to_it_recovered(
        start_demo, tmp_path):
    vm = start_demo()
    before_chain = chain(vm)
    killed = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                     "--workdir", str(tmp_path / "work"), env={"KVMSNAP_FAULT": "archiving"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    [good] = journals()
    broken = state_dir() / "broken-0123456789ab.json"
    broken.write_text('{"vm": "other", "phase": "forked", "overlays": [{"disk"')
    try:
        done = kvmsnap("recover", "--json")
        assert done.returncode == 2, done.stderr[-2000:]  # a problem was reported
        results = {r["vm"]: r for r in json.loads(done.stdout)}
        assert results["demo"]["problems"] == [] and results["demo"]["actions"]
        [problem] = results[broken.stem]["problems"]
        kept = state_dir() / "broken-0123456789ab.json.corrupt"
        assert f"{broken} cannot be read" in problem and f"kept as {kept}" in problem
        assert "by hand" in problem and "delete it" in problem
        assert kept.exists() and not broken.exists() and not good.exists()
        assert chain(vm) == before_chain and vm.qmp.runstate() == "running"
        again = kvmsnap("recover")  # the corrupt file is out of the way now
        assert again.returncode == 0 and "nothing to recover" in again.stdout
    finally:
        for path in state_dir().glob("broken-*"):
            path.unlink()


# -- one lock per VM ------------------------------------------------------------------------
class SecondRuns:
    """While a real backup holds its VM, other runs try the same VM by other paths."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.results: list[subprocess.CompletedProcess] = []

    @hookimpl
    def kvmsnap_post_shutdown(self):
        for path in self.paths:
            self.results.append(kvmsnap("fork", "--qmp", str(path)))


@pytest.fixture
def bind_mounted(tmp_path):
    """``bind(socket)``: the socket file bind-mounted elsewhere (realpath cannot see it)."""
    targets = []

    def bind(source: Path) -> Path:
        target = tmp_path / f"bound{len(targets)}.qmp"
        target.touch()
        process.run(["mount", "--bind", source, target], timeout=30)
        targets.append(target)
        return target

    yield bind
    for target in targets:
        process.run(["umount", target], timeout=30)


def test_two_paths_to_one_vm_are_one_lock(start_demo, tmp_path, bind_mounted):
    vm = start_demo()
    link = tmp_path / "link.qmp"
    link.symlink_to(vm.paths.backup_qmp)
    bound = bind_mounted(vm.paths.backup_qmp)
    assert os.path.realpath(bound) != os.path.realpath(vm.paths.backup_qmp)
    # the symlink, a bind mount, and the VM's other QMP socket (held by the test itself)
    second = SecondRuns([link, bound, vm.paths.qmp])
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(workdir=tmp_path / "work"))
    report = backup(job, Hooks(plugin_manager([second], entry_points=False)))
    assert report.clean
    assert len(second.results) == 3
    for done in second.results:
        assert_one_line_error(done, "another kvmsnap run", f"pid {os.getpid()}")
    assert stops(vm) == 1  # the first run's pause, and no other
    assert journals() == []


# -- a split backup is its reader's until released ------------------------------------------
@pytest.fixture
def split_vm(start_demo):
    """A demo VM whose split backups are taken down after the test, whatever happened."""
    vm = start_demo()
    yield vm
    if journals():
        kvmsnap("recover", "--force")


def mount_split(vm, tmp_path: Path, root: Path) -> None:
    done = kvmsnap("mount", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                   "--workdir", str(tmp_path / "work"), "--mount-root", str(root))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "vdisk0" / "workload.log").exists()


def test_recover_leaves_a_mounted_split_backup_to_its_reader(split_vm, tmp_path):
    vm = split_vm
    before_chain = chain(vm)
    root = tmp_path / "mnt" / "demo"
    mount_split(vm, tmp_path, root)
    [journal] = journals()

    done = kvmsnap("recover", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    [result] = json.loads(done.stdout)
    assert result["actions"] == [f"left alone: mounted at {root}, waiting for `kvmsnap "
                                 "release` (or `kvmsnap recover --force`)"]
    assert (root / "vdisk0" / "workload.log").read_text()  # the reader reads on
    assert journal.exists() and chain(vm) != before_chain

    paused = stops(vm)
    for command in ("fork", "mount"):  # a second run of the same VM is refused
        assert_one_line_error(kvmsnap(command, "--qmp", str(vm.paths.backup_qmp)),
                              f"still mounted at {root}", "run `kvmsnap release` first")
    assert stops(vm) == 0 and paused == 1

    released = kvmsnap("release", "--qmp", str(vm.paths.backup_qmp))
    assert released.returncode == 0, released.stderr[-2000:]
    assert not mounted(tmp_path) and chain(vm) == before_chain and journals() == []


def test_recover_takes_down_a_split_backup_when_forced_or_stale(split_vm, tmp_path):
    vm = split_vm
    before_chain = chain(vm)
    root = tmp_path / "mnt" / "demo"
    mount_split(vm, tmp_path, root)
    forced = kvmsnap("recover", "--force", "--json")
    assert forced.returncode == 0, forced.stderr[-2000:]
    [result] = json.loads(forced.stdout)
    assert any(a.startswith("unmounted") for a in result["actions"]), result
    assert not mounted(tmp_path) and chain(vm) == before_chain and journals() == []

    # Stale: its reader's mounts are gone (unmounted by hand, or a reboot took them).
    mount_split(vm, tmp_path, root)
    [journal] = journals()
    state = read_state(journal)
    for path in reversed(state.mounts):
        process.run(["umount", path], timeout=60)
    for path in state.exports:  # the loop devices on them stay: recovery detaches them
        process.run(["umount", "-l", path], timeout=60)
    stale = kvmsnap("recover", "--json")
    assert stale.returncode == 0, stale.stderr[-2000:]
    [result] = json.loads(stale.stdout)
    assert result["problems"] == [] and not any("left alone" in a for a in result["actions"])
    assert not mounted(tmp_path) and chain(vm) == before_chain and journals() == []
    vm.wait_counter(vm.counter() + 2)
