"""The Debian test guest: systemd boots it, logind handles the power button, and the
difference between a crash-consistent copy and a clean shutdown is visible on both the
ext4 root and the xfs data volume.

One guest boots per module (about 20 s under TCG); the tests run in file order on it:
first a copy taken while it runs, then the power button.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmsnap_demo.debian import (
    BUTTON_WATCHED,
    LAYOUT,
    DebianGuest,
    DebianVM,
    apt_mirror,
    debian_vm,
    fstab,
    read_guest_disk,
)
from kvmsnap_plugin.model import FsState

BOOT_BOUND = 180.0  # seconds from QEMU start to KVMSNAP-READY under a loaded TCG host
POWER_OFF_BOUND = 60.0  # seconds from the power button to QEMU's exit


@dataclass(frozen=True)
class DebianRun:
    vm: DebianVM
    boot_seconds: float


@pytest.fixture(scope="module")
def debian_run(debian_guest: DebianGuest, accel: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebianRun]:
    """One booted guest for this module; QEMU is always ended when the module is done."""
    workdir = tmp_path_factory.mktemp("debian")
    started = time.monotonic()
    with debian_vm(debian_guest, accel, workdir) as vm:
        vm.wait_ready(timeout=BOOT_BOUND)
        yield DebianRun(vm, time.monotonic() - started)


@pytest.mark.qemu
def test_boots_with_systemd_and_logind_watching_the_power_button(debian_run: DebianRun):
    vm = debian_run.vm
    console = vm.plain_console()
    assert re.search(r"systemd\[1\]: systemd 252", console)
    assert re.search(BUTTON_WATCHED, console)
    assert "Started kvmsnap-workload.service" in console
    assert debian_run.boot_seconds < BOOT_BOUND
    before = vm.counter()
    assert vm.wait_counter(before + 5) >= before + 5


@pytest.mark.qemu
def test_copy_taken_while_running_is_crash_consistent(debian_run: DebianRun, tmp_path: Path):
    vm = debian_run.vm
    counter = vm.wait_counter(20)  # 2 s: xfs has forced its log (every 1 s in this guest)
    crash = tmp_path / "crash.raw"
    try:
        vm.crash_copy(0, crash)
        disk = read_guest_disk(crash, tmp_path / "scratch")
    finally:
        crash.unlink(missing_ok=True)
    root, data = disk["root"], disk["data"]
    assert root.state is FsState.NEEDS_RECOVERY, root.detail
    assert data.state is FsState.NEEDS_RECOVERY, data.detail
    for fs in (root, data):
        assert len(fs.lines) < counter  # the buffered lines never reached the disk
        assert not fs.marker  # no marker (at most an empty, unreplayed directory entry)
    assert vm.running()  # the copy paused the guest only; it runs on
    assert vm.wait_counter(counter + 3) > counter


@pytest.mark.qemu
def test_power_button_shuts_down_cleanly(debian_run: DebianRun, tmp_path: Path):
    vm = debian_run.vm
    assert vm.running()
    vm.wait_counter(vm.counter() + 3)
    pressed_at = len(vm.plain_console())
    seconds = vm.power_off_cleanly(timeout=POWER_OFF_BOUND)
    assert seconds < POWER_OFF_BOUND
    shutdown = vm.plain_console()[pressed_at:]
    assert "systemd-logind" in shutdown and "Power key pressed" in shutdown
    for status in ("Stopping kvmsnap-workload.service", "Stopped kvmsnap-workload.service",
                   "Unmounted data.mount", "Reached target shutdown.target"):
        assert status in shutdown, status
    assert "reboot: Power down" in shutdown

    last = vm.stopped_at()
    assert last is not None and last >= 20
    disk = read_guest_disk(vm.paths.disks[0], tmp_path / "scratch")
    for fs in disk.values():
        assert fs.state is FsState.CLEAN, f"{fs.name}: {fs.detail}"
        assert fs.continuous and len(fs.lines) == last, fs.name
        assert fs.marker == f"clean shutdown after line {last}", fs.name


def test_mirror_is_read_from_the_hosts_apt_sources(tmp_path: Path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d/debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://old.example/debian bookworm main contrib\n")
    assert apt_mirror(tmp_path) == "http://old.example/debian"


def test_fstab_mounts_by_uuid_with_a_long_ext4_commit_interval():
    parts = [dataclasses.replace(p, uuid=f"uuid-{p.number}") for p in LAYOUT]
    assert fstab(parts).splitlines()[1:] == [
        "UUID=uuid-1 / ext4 defaults,commit=600 0 0",
        "UUID=uuid-2 /data xfs defaults 0 0",
    ]
