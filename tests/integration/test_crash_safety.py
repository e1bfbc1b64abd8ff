"""kvmsnap killed with SIGKILL at every phase: `kvmsnap recover` leaves the parent running
on its original disk chain, nothing behind, and no write of the guest lost."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cli_helpers import kvmsnap

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin.host.faults import POINTS
from kvmsnap_plugin.model import FsState
from kvmsnap_plugin.run.journal import state_dir

pytestmark = pytest.mark.qemu


def chain(vm) -> list[str]:
    return [b["inserted"]["file"] for b in vm.qmp.execute("query-block")]


def our_processes(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and "pytest" not in text:
            found.append(text[:160])
    return found


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_phase_then_recover(start_demo, tmp_path, borg_repo, point):
    vm = start_demo()
    image = vm.paths.disks[0]
    before_chain = chain(vm)
    before = vm.wait_counter(10)
    work = tmp_path / "work"
    killed = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                     "--workdir", str(work), "--borg", str(borg_repo),
                     env={"KVMSNAP_FAULT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(state_dir().glob("*.json")), "the killed run left no journal"

    recovered = kvmsnap("recover", "--json")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr[-2000:]
    [result] = json.loads(recovered.stdout)
    assert result["problems"] == []

    assert vm.qmp.runstate() == "running"
    assert chain(vm) == before_chain
    assert not list(image.parent.glob("*.kvmsnap-*"))  # the parent's overlay is gone
    assert our_processes(str(work)) == []  # no clone, no export daemon
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert str(tmp_path) not in subprocess.run(["losetup", "-a"], capture_output=True,
                                               text=True).stdout
    assert [p for p in work.rglob("*") if not p.is_dir()] == []
    assert not list(state_dir().glob("*.json"))
    # Later, a clean shutdown: every line the guest wrote, before and after, is there.
    vm.wait_counter(vm.counter() + 2)
    vm.power_off_cleanly()
    disk = read_disk(image, tmp_path / "after.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) > before
    # And the next backup of this VM runs normally.
