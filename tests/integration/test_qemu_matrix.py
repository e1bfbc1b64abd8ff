"""What differs between QEMU versions, on each build of the matrix (Debian 12's 7.2 and 10.0).

The fork engine with both RAM methods (who resumes the guest after a background snapshot
changed in 9.0), the clone restoring the parent's stream with the parent's own binary,
commit back, and one full `kvmsnap backup --borg`. Correctness only: how long the pause is
on each version is the benchmarks' business (`python -m bench --qemu 7.2,10.0`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import kvmsnap
from test_archivers import assert_clean_workload, borg
from test_fork import chain_of, fork, stopped_at

from kvmsnap_demo.disk import read_disk
from kvmsnap_demo.hugetlb import free_pages
from kvmsnap_plugin.host.hugepages import guest_ram_blocks
from kvmsnap_plugin.model import FsState

pytestmark = pytest.mark.qemu

HUGE_GUEST_MIB = 256


def start_on(start_demo, build, **options):
    """A demo parent on ``build``, checked to really be that QEMU."""
    vm = start_demo(binary=build.binary, **options)
    version = vm.qmp.execute("query-version")["qemu"]
    assert f"{version['major']}.{version['minor']}" == build.name
    return vm


def assert_clone_ran_the_parents_qemu(report, vm, build) -> None:
    binary = report.clone_binary
    assert binary.path == os.readlink(f"/proc/{vm.pid}/exe")  # the prefix's, not the wrapper
    assert ".".join(map(str, binary.version)).startswith(f"{build.name}.")


@pytest.mark.parametrize("method", ["background-snapshot", "stop-and-copy"])
def test_fork_clone_and_commit_back(start_demo, tmp_path, qemu_build, method):
    assert_forks_clean_and_loses_no_write(start_on(start_demo, qemu_build), tmp_path,
                                          qemu_build, method)


def test_a_parent_in_huge_pages_forks_in_the_background(start_demo, tmp_path, qemu_build,
                                                        huge_page_pool):
    """Guest RAM in hugetlbfs pages (libvirt's <hugepages/>): QEMU write-protects and copies
    it in 2 MiB pages; the clone takes its RAM from the same pool and gives it back."""
    pages = HUGE_GUEST_MIB // 2
    huge_page_pool(2 * pages)  # the parent's, then the clone's
    free = free_pages()
    vm = start_on(start_demo, qemu_build, memory_mib=HUGE_GUEST_MIB, extra_args=(
        "-object", f"memory-backend-memfd,id=ram0,size={HUGE_GUEST_MIB}M,hugetlb=on,"
                   "hugetlbsize=2M,prealloc=on", "-machine", "memory-backend=ram0"))
    assert free_pages() == free - pages  # the parent's RAM is really in the pool
    # ... and the read-ahead before the pause sees it, in 2 MiB pages as QEMU reads it
    assert [(m.high - m.low) >> 20 for m in guest_ram_blocks(vm.pid)
            if m.page_kib == 2048] == [HUGE_GUEST_MIB]
    assert_forks_clean_and_loses_no_write(vm, tmp_path, qemu_build, "background-snapshot")
    assert free_pages() == free  # the parent is gone, and the clone gave its pages back


def assert_forks_clean_and_loses_no_write(vm, tmp_path: Path, build, method: str) -> None:
    disk = vm.paths.disks[0]
    chain_before = chain_of(disk)
    before = vm.wait_counter(10)
    result, frozen = fork(vm, tmp_path, method=method)
    # The report: the method asked for, a measured pause (its length is for benchmarks).
    assert result.method == method and result.pause_ms > 0
    assert_clone_ran_the_parents_qemu(result, vm, build)
    # The clone restored the instant of the fork and shut down cleanly.
    assert result.label == "clean" and result.shutdown.reason == "guest-shutdown"
    clone = read_disk(Path(result.kept[0]), tmp_path / "kept.raw")
    last = stopped_at((tmp_path / "clone.log").read_text())
    assert clone.state is FsState.CLEAN and clone.continuous
    assert len(clone.lines) == last >= before
    assert clone.marker == f"clean shutdown after line {last}"
    assert frozen[0].state is FsState.NEEDS_RECOVERY  # the crash view of the same instant
    # The parent runs on (whoever resumed it), and gets its chain back with every write.
    assert vm.qmp.runstate() == "running"
    assert vm.wait_counter(vm.counter() + 3) > last
    assert chain_of(disk) == chain_before
    assert [commit.layer for commit in result.commits] == ["active"]
    vm.power_off_cleanly()
    parent = read_disk(disk, tmp_path / "parent.raw")
    assert parent.state is FsState.CLEAN and parent.continuous
    assert len(parent.lines) == stopped_at(vm.console()) > last  # written during the backup


def test_borg_backup_round_trip(start_demo, tmp_path, qemu_build, borg_repo):
    vm = start_on(start_demo, qemu_build)
    chain_before = chain_of(vm.paths.disks[0])
    before = vm.wait_counter(10)
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                   "--workdir", str(tmp_path / "work"), "--borg", str(borg_repo), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["status"] == "ok" and report["clean"] is True
    assert report["clone_binary"]["path"] == os.readlink(f"/proc/{vm.pid}/exe")
    [archive] = json.loads(borg("list", "--json", borg_repo))["archives"]
    assert archive["name"] == report["archives"][0]["name"]
    out = tmp_path / "extract"
    out.mkdir()
    borg("extract", f"{borg_repo}::{archive['name']}", cwd=out)
    assert_clean_workload(out / "vdisk0", before)  # the marker file of the clean shutdown
    assert vm.qmp.runstate() == "running"
    assert chain_of(vm.paths.disks[0]) == chain_before
