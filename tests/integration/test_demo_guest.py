"""The demo guest really boots, writes, and shuts down cleanly on the power button."""

from __future__ import annotations

import re
import time

import pytest

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin.model import FsState

pytestmark = pytest.mark.qemu


def stopped_at(vm) -> int:
    return int(re.search(r"KVMSNAP-WORKLOAD-STOPPED (\d+)", vm.console()).group(1))


def test_boots_writes_and_shuts_down_cleanly(start_demo, tmp_path):
    vm = start_demo()
    vm.wait_counter(10)
    started = time.monotonic()
    vm.power_off_cleanly(timeout=30)
    assert time.monotonic() - started < 30
    assert "KVMSNAP-POWER-BUTTON" in vm.console()
    last = stopped_at(vm)
    disk = read_disk(vm.paths.disks[0], tmp_path / "disk.raw")
    assert disk.state is FsState.CLEAN
    assert disk.continuous and len(disk.lines) == last >= 10
    assert disk.marker == f"clean shutdown after line {last}"


def test_crash_consistent_copy_misses_buffered_writes(start_demo, crash_consistent_copy):
    vm = start_demo()
    counter = vm.wait_counter(10)
    crash = crash_consistent_copy(vm, 0)
    assert crash.state is FsState.NEEDS_RECOVERY
    assert len(crash.lines) < counter  # the buffered lines never reached the disk
    assert crash.marker is None
    assert vm.running()  # the copy paused the guest only; it runs on
    assert vm.wait_counter(counter + 3) > counter


def test_guest_that_ignores_the_power_button_keeps_running(start_demo):
    vm = start_demo(power_button="ignore")
    vm.qmp.execute("system_powerdown")
    vm.wait_console("KVMSNAP-POWER-BUTTON-IGNORED", 20)
    assert not vm.wait_exit(3)
    assert vm.qmp.runstate() == "running"
    assert vm.shutdown(powerdown_timeout=2) == "quit"  # the ladder's next rung ends it
    assert not vm.running()


def test_two_disks_are_both_seen_and_written(start_demo, tmp_path):
    vm = start_demo(disks=2)  # disk 0 via -blockdev, disk 1 via -drive
    assert re.search(r"KVMSNAP-READY disks= vda vdb", vm.console())
    vm.wait_counter(5)
    vm.power_off_cleanly()
    last = stopped_at(vm)
    for index, disk in enumerate(vm.paths.disks):
        contents = read_disk(disk, tmp_path / f"d{index}.raw")
        assert contents.state is FsState.CLEAN
        assert contents.continuous and len(contents.lines) == last


def test_ram_size_is_configurable(start_demo):
    vm = start_demo(memory_mib=384)
    summary = vm.qmp.execute("query-memory-size-summary")
    assert summary["base-memory"] == 384 << 20


def test_qmp_errors_become_one_line_vm_errors(start_demo):
    from kvmsnap_plugin.errors import VMError

    vm = start_demo()
    with pytest.raises(VMError, match="QMP no-such-command failed: The command no-such-command"):
        vm.qmp.execute("no-such-command")
