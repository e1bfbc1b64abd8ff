"""What the host has room for: sizes, free space, the clone's memory, its OOM score."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import HostError, UsageError
from kvmsnap_plugin.host import process, resources
from kvmsnap_plugin.host.resources import (
    QEMU_OVERHEAD,
    CloneMemory,
    SpaceNeed,
    check_clone_memory,
    check_space,
    human,
    parse_size,
)
from kvmsnap_plugin.model import Parent
from kvmsnap_plugin.vm.clone import clone_memory

MIB, GIB = 1 << 20, 1 << 30


@pytest.mark.parametrize("text, size", [
    (0, 0), (4096, 4096), ("4096", 4096), ("1G", GIB), ("512M", 512 * MIB),
    ("1.5GiB", GIB * 3 // 2), ("2g", 2 * GIB), ("64K", 64 << 10), ("1T", 1 << 40),
    (" 3 M ", 3 * MIB), ("100B", 100),
])
def test_sizes_read_as_qemu_writes_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "1X", "", True, -5, "1.2.3G"])
def test_a_bad_size_is_refused_with_an_example(text):
    with pytest.raises(UsageError, match="min_free") as info:
        parse_size(text, "min_free")
    assert "1G" in info.value.hint


def test_sizes_are_shown_for_people():
    assert [human(n) for n in (100, 12 << 10, 256 * MIB, GIB * 3 // 2, 1 << 40)] == \
        ["100 B", "12 KiB", "256 MiB", "1.5 GiB", "1 TiB"]


# -- space ----------------------------------------------------------------------------------
def test_a_directory_still_to_be_made_is_measured_where_it_would_be(tmp_path):
    assert resources.existing_ancestor(tmp_path / "a" / "b") == tmp_path
    stats = os.statvfs(tmp_path)
    assert resources.free_bytes(tmp_path / "a") == stats.f_bavail * stats.f_frsize


def test_what_fits_passes_and_what_does_not_is_refused_with_the_numbers(tmp_path):
    free = resources.free_bytes(tmp_path)
    work = SpaceNeed(tmp_path / "work", GIB, "the RAM state", "--workdir")
    check_space([work], margin=0)
    with pytest.raises(HostError) as info:
        check_space([SpaceNeed(tmp_path / "work", free, "the RAM state", "--workdir")],
                    margin=GIB)
    message = str(info.value)
    assert f"not enough free space in {tmp_path / 'work'} for the RAM state" in message
    assert f"{human(free)} free" in message and f"{human(free + GIB)} needed" in message
    assert "the VM was not paused" in message
    assert "--workdir" in info.value.hint and "--min-free" in info.value.hint


def test_needs_on_one_filesystem_add_up_and_the_margin_counts_once(tmp_path):
    free = resources.free_bytes(tmp_path)
    half = SpaceNeed(tmp_path / "work", free // 2 + MIB, "the RAM state", "--workdir")
    overlays = SpaceNeed(tmp_path / "images", free // 2 + MIB, "the overlays", "--overlay-dir")
    check_space([half], margin=0)
    check_space([overlays], margin=0)
    with pytest.raises(HostError, match="the RAM state and the overlays") as info:
        check_space([half, overlays], margin=0)
    assert "--overlay-dir or --workdir" in info.value.hint
    check_space([SpaceNeed(tmp_path, 0, "a", "--a"), SpaceNeed(tmp_path, 0, "b", "--b")],
                margin=free - MIB)  # not twice the margin


def test_a_filesystem_without_a_size_is_left_to_the_write_itself():
    check_space([SpaceNeed(Path("/proc/kvmsnap"), 1 << 40, "the RAM state", "--workdir")],
                margin=GIB)  # procfs: creating the directory fails, with its own message


# -- the work directory ---------------------------------------------------------------------
def test_the_work_directory_on_a_network_or_fuse_filesystem_is_refused_unless_allowed(
        tmp_path, monkeypatch):
    monkeypatch.setattr(resources.mounts, "filesystem_type", lambda path: "nfs4")
    with pytest.raises(HostError, match="on a nfs4 filesystem") as info:
        resources.check_workdir(tmp_path / "work", allow_remote=False)
    assert "the VM was not paused" in str(info.value)
    assert "--allow-remote-workdir" in info.value.hint
    resources.check_workdir(tmp_path / "work", allow_remote=True)
    monkeypatch.setattr(resources.mounts, "filesystem_type", lambda path: "ext4")
    resources.check_workdir(tmp_path / "local", allow_remote=False)
    assert list(tmp_path.iterdir()) == []  # checked before the pause, made after


def test_a_world_writable_work_directory_is_refused_before_anything_is_made(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    for check in (lambda: resources.check_workdir(work, allow_remote=False),
                  lambda: resources.make_workdir(work, "web")):
        with pytest.raises(HostError, match=f"the work directory {work} is writable by "
                                            "group or others"):
            check()
    assert list(work.iterdir()) == []


def test_the_default_work_directory_must_be_0700_one_the_user_names_need_not(
        tmp_path, monkeypatch):
    shared = tmp_path / "kvmsnap"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert resources.make_workdir(shared, "web").parent == shared  # --workdir: 0755 will do
    monkeypatch.setattr(resources, "DEFAULT_WORKDIR", shared)
    with pytest.raises(HostError, match="is not mode 0700"):
        resources.make_workdir(shared, "web")
    run = resources.make_workdir(tmp_path / "fresh", "web")
    assert [oct(p.stat().st_mode & 0o777) for p in (run.parent, run)] == ["0o700", "0o700"]


# -- memory ---------------------------------------------------------------------------------
def fake_meminfo(tmp_path: Path, available: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {64 * GIB >> 10} kB\n"
                    f"MemAvailable:   {available >> 10} kB\n"
                    "HugePages_Free:       3\nHugepagesize:       2048 kB\n")
    return path


def fake_hugepages(tmp_path: Path, free: int, reserved: int) -> Path:
    pool = tmp_path / "hugepages" / "hugepages-2048kB"
    pool.mkdir(parents=True)
    (pool / "free_hugepages").write_text(f"{free}\n")
    (pool / "resv_hugepages").write_text(f"{reserved}\n")
    return pool.parent


def test_the_host_meminfo_reads_in_bytes(tmp_path):
    info = resources.meminfo(fake_meminfo(tmp_path, 3 * GIB))
    assert info["MemAvailable"] == 3 * GIB and info["HugePages_Free"] == 3
    assert info["Hugepagesize"] == 2 * MIB
    assert resources.meminfo()["MemAvailable"] > 0  # and the real one


def test_a_clone_that_does_not_fit_in_memory_is_refused_with_the_numbers(tmp_path):
    meminfo = fake_meminfo(tmp_path, 4 * GIB)
    check_clone_memory(CloneMemory(4 * GIB - QEMU_OVERHEAD), meminfo_path=meminfo)
    with pytest.raises(HostError, match="not enough memory for the clone") as info:
        check_clone_memory(CloneMemory(4 * GIB), meminfo_path=meminfo)
    assert "4 GiB available (MemAvailable), 4.2 GiB needed" in str(info.value)
    assert "the VM was not paused" in str(info.value) and "free memory" in info.value.hint


def test_huge_pages_come_from_their_own_pool(tmp_path):
    meminfo = fake_meminfo(tmp_path, 512 * MIB)  # ordinary memory: too little for 4 GiB
    pool = fake_hugepages(tmp_path, free=2100, reserved=50)  # 2050 of 2 MiB: 4.004 GiB
    in_huge_pages = CloneMemory(4 * GIB, {2 * MIB: 4 * GIB})
    check_clone_memory(in_huge_pages, meminfo_path=meminfo, hugepages_root=pool)
    (pool / "hugepages-2048kB" / "resv_hugepages").write_text("100\n")
    with pytest.raises(HostError, match="2000 free, 2048 needed") as info:
        check_clone_memory(in_huge_pages, meminfo_path=meminfo, hugepages_root=pool)
    assert "add 48 to" in info.value.hint and "nr_hugepages" in info.value.hint
    with pytest.raises(HostError, match="huge pages"):  # no pool of that size at all
        check_clone_memory(CloneMemory(GIB, {GIB: GIB}), meminfo_path=meminfo,
                           hugepages_root=pool)


def test_a_clone_that_locks_its_ram_must_be_allowed_to(tmp_path, monkeypatch):
    meminfo = fake_meminfo(tmp_path, 8 * GIB)
    locked = CloneMemory(GIB, locked=True)
    check_clone_memory(locked, meminfo_path=meminfo)  # root (these tests' user) may
    monkeypatch.setattr(resources.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(resources.resource, "getrlimit", lambda _: (64 << 10, 64 << 10))
    with pytest.raises(HostError, match="locks its RAM") as info:
        check_clone_memory(locked, meminfo_path=meminfo)
    assert "ulimit -l" in info.value.hint
    check_clone_memory(CloneMemory(GIB), meminfo_path=meminfo)  # unlocked: no limit
    monkeypatch.setattr(resources.resource, "getrlimit",
                        lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    check_clone_memory(locked, meminfo_path=meminfo)


class FakeMonitor:
    def execute(self, command, arguments=None, *, timeout=None):
        assert command == "query-memory-size-summary"
        return {"base-memory": GIB, "plugged-memory": 512 * MIB}


def parent_with(*args: str) -> Parent:
    argv = ("qemu-system-x86_64", "-m", "1536M", *args)
    return Parent(None, os.getpid(), "web", argv, (7, 2, 0), ())


def test_the_clone_needs_the_guests_ram_as_qemu_reports_it():
    assert clone_memory(parent_with(), FakeMonitor()) == CloneMemory(GIB + 512 * MIB)


def test_huge_page_and_locked_backends_are_recognised(tmp_path):
    memory = clone_memory(parent_with(
        "-object", "memory-backend-memfd,id=m0,size=1G,hugetlb=on,hugetlbsize=2M",
        "-object", '{"qom-type":"memory-backend-memfd","id":"m1","size":536870912,'
                   '"hugetlb":true,"hugetlbsize":1073741824}',
        "-object", "memory-backend-ram,id=m2,size=1G,prealloc=on",
        "-overcommit", "mem-lock=on"), FakeMonitor())
    assert memory.huge == {2 * MIB: GIB, GIB: 512 * MIB} and memory.locked
    assert memory.ordinary == GIB + 512 * MIB - (GIB + 512 * MIB)
    assert not clone_memory(parent_with("-overcommit", "mem-lock=off"), FakeMonitor()).locked
    assert clone_memory(parent_with("-realtime", "mlock=on"), FakeMonitor()).locked


@pytest.fixture
def hugetlbfs(tmp_path):
    mountpoint = tmp_path / "huge"
    mountpoint.mkdir()
    process.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "kvmsnap-test",
                 mountpoint], timeout=30)
    yield mountpoint
    process.run(["umount", mountpoint], timeout=30)


def test_a_file_backend_on_hugetlbfs_is_found_by_its_mount(hugetlbfs, tmp_path):
    assert resources.hugetlbfs_page_size(str(hugetlbfs / "guest"), os.getpid()) == 2 * MIB
    assert resources.hugetlbfs_page_size(str(tmp_path / "ram"), os.getpid()) is None
    memory = clone_memory(parent_with(
        "-object", f"memory-backend-file,id=m0,size=1G,mem-path={hugetlbfs},share=off",
        "-object", f"memory-backend-file,id=m1,size=512M,mem-path={tmp_path}/ram"),
        FakeMonitor())
    assert memory.huge == {2 * MIB: GIB}


def test_the_clone_is_made_the_oom_killers_first_choice():
    proc = process.spawn(["sleep", "30"])
    try:
        resources.make_oom_victim(proc.pid)
        assert Path(f"/proc/{proc.pid}/oom_score_adj").read_text().strip() == "1000"
    finally:
        process.end(proc)
    resources.make_oom_victim(proc.pid)  # gone: only a warning
