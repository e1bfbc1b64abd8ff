"""A VM whose disk is a host block device (a loop device standing in for an LVM volume, a
zvol or a mapped iSCSI/RBD volume): forked, archived, committed back into the device."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, kvmsnap

from kvmsnap_demo.builder import make_data_disk
from kvmsnap_demo.disk import read_disk
from kvmsnap_demo.vm import DemoOptions, DemoPaths, DemoVM, demo_argv
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import FsState
from kvmsnap_plugin.paths import socket_dir
from kvmsnap_plugin.run.journal import state_dir
from kvmsnap_plugin.vm.qemu_args import escape

pytestmark = pytest.mark.qemu
pytest_plugins = ["libvirt_fixtures"]  # the libvirtd fixture

#: how the parent names its disk: the modern way (libvirt's) and the legacy one
ON_DEVICE = {
    # cache.direct: a typed option in dotted syntax, as users write it (the clone keeps it)
    "blockdev": lambda loop: ["-blockdev", f"driver=host_device,filename={loop},"
                                           "node-name=disk0-file,cache.direct=on",
                              "-blockdev", "driver=raw,file=disk0-file,node-name=disk0"],
    "drive": lambda loop: ["-drive", f"file={loop},format=raw,if=none,id=disk0"],
    # oVirt's way: the volume holds a qcow2, not raw; the protocol node is nested (unnamed)
    "qcow2": lambda loop: ["-blockdev", f"driver=qcow2,node-name=disk0,"
                                        f"file.driver=host_device,file.filename={loop}"],
}
#: the size of the volume a qcow2 is put on: room for its clusters to be allocated in (an
#: LV holding a qcow2 is made larger than the image, and extended as it fills)
QCOW2_VOLUME_BYTES = 128 << 20


def loop_devices() -> list[str]:
    return process.run(["losetup", "-a"], timeout=30).stdout.splitlines()


@contextlib.contextmanager
def loop_device(raw: Path) -> Iterator[Path]:
    """``raw`` as a loop device, always detached afterwards."""
    loop = Path(process.run(["losetup", "-f", "--show", raw], timeout=30).stdout.strip())
    try:
        yield loop
    finally:
        process.run(["losetup", "-d", loop], timeout=30, check=False)


@pytest.fixture
def vm_on_device(demo_guest, accel, tmp_path):
    """Factory: ``start(syntax)`` -> (a ready demo guest whose disk is a loop device over a
    raw copy of its data disk, the loop device, the raw file). The guest is stopped and the
    loop device detached afterwards, whatever happens. ``start("qcow2")``: the loop device
    holds the qcow2 itself (the file returned), in a larger volume."""
    with contextlib.ExitStack() as stack:
        def start(syntax: str) -> tuple[DemoVM, Path, Path]:
            qcow2 = make_data_disk(tmp_path / "data0.qcow2", 64, "data0")
            raw = tmp_path / "data0.raw"
            if syntax == "qcow2":
                os.truncate(qcow2, QCOW2_VOLUME_BYTES)
                raw = qcow2
            else:
                process.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw],
                            timeout=120)
                qcow2.unlink()
            loop = stack.enter_context(loop_device(raw))
            opts = DemoOptions(disk_syntax=("drive",))
            sockets = stack.enter_context(socket_dir())
            paths = DemoPaths(tmp_path, (loop,), sockets / "qmp.sock",
                              sockets / "backup-qmp.sock", tmp_path / "console.log")
            argv = demo_argv(demo_guest, accel, paths, opts)
            at = argv.index("-drive")
            assert argv[at + 1].startswith(f"file={escape(loop)},")
            argv[at:at + 2] = ON_DEVICE[syntax](loop)
            vm = stack.enter_context(DemoVM(argv, paths, opts))
            vm.wait_ready()
            return vm, loop, raw

        yield start


def borg_extract(repo: Path, archive: str, into: Path) -> None:
    into.mkdir()
    process.run([process.find_program("borg", "borgbackup"), "extract", "--sparse",
                 f"{repo}::{archive}"], timeout=600, cwd=into)


def archived_lines(repo: Path, out: Path, disk: str, *args: str) -> list[str]:
    """`kvmsnap backup ARGS` in files mode into borg: clean, committed back (the overlay was
    the disk's top); the workload's lines as archived, every one and the clean marker."""
    done = kvmsnap("backup", *args, "--borg", str(repo), "--mode", "files", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["clean"] and report["commits"][0]["layer"] == "active"
    borg_extract(repo, report["archives"][0]["name"], out)
    lines = (out / disk / "workload.log").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)]
    marker = (out / disk / "clean-shutdown").read_text().strip()
    assert marker == f"clean shutdown after line {len(lines)}"
    return lines


def our_loops(tmp_path: Path) -> list[str]:
    return [line for line in loop_devices() if str(tmp_path) in line]


def test_a_vm_on_a_block_device_is_backed_up_and_committed_back(vm_on_device, tmp_path,
                                                                 borg_repo):
    vm, loop, raw = vm_on_device("blockdev")
    before = vm.wait_counter(10)
    workdir = tmp_path / "work"
    plan = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--workdir", str(workdir),
                   "--borg", str(borg_repo), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    overlay = json.loads(plan.stdout)["disks"][0]["overlay"]
    # never in /dev: in the work directory's own overlays directory
    assert re.fullmatch(rf"{workdir}/overlays/{loop.name}\.kvmsnap-RUN\.qcow2", overlay)

    lines = archived_lines(borg_repo, tmp_path / "extract", "vdisk0", "--qmp",
                           str(vm.paths.backup_qmp), "--workdir", str(workdir))
    assert len(lines) >= before

    # The parent ran on, on its device again: no overlay left, nothing else either.
    after = vm.wait_counter(vm.counter() + 5)
    assert list((workdir / "overlays").iterdir()) == []
    assert [b["inserted"]["image"]["filename"] for b in vm.qmp.execute("query-block")
            if b.get("inserted")] == [str(loop)]
    assert our_loops(tmp_path) == [line for line in loop_devices() if str(raw) in line]
    assert len(our_loops(tmp_path)) == 1 and str(loop) in our_loops(tmp_path)[0]
    vm.power_off_cleanly(timeout=60)
    # Every line the parent wrote, before, during and after the backup, is in the device.
    disk = read_disk(raw, raw)
    assert disk.state is FsState.CLEAN and disk.continuous
    assert len(disk.lines) >= after > len(lines)
    assert disk.marker == f"clean shutdown after line {len(disk.lines)}"


def test_a_qcow2_on_a_block_device_is_forked_and_committed_back_into_it(vm_on_device,
                                                                        tmp_path, borg_repo):
    """The device holds a qcow2 (oVirt's LVs do): the parent's overlay is a qcow2 file on
    the qcow2 on the device; a write the parent makes during the backup lands in the
    overlay and is committed back into the qcow2 on the device; the chain ends as it began."""
    vm, loop, image = vm_on_device("qcow2")
    chain = [b["inserted"]["file"] for b in vm.qmp.execute("query-block")]
    assert chain == [str(loop)]
    before = vm.wait_counter(10)
    work = tmp_path / "work"
    args = ("--qmp", str(vm.paths.backup_qmp), "--workdir", str(work))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(archived_lines, borg_repo, tmp_path / "extract", "vdisk0", *args)
        top = wait_for_overlay(vm, running)
        assert top["file"].startswith(f"{work}/overlays/{loop.name}.kvmsnap-")
        # Through the disk's own BlockBackend (another writer conflicts with virtio-blk's);
        # qemu-io prints to QEMU's stdout: the overlay's contents are checked instead.
        for command in ("write -P 0x5a 60M 64k", "flush"):
            vm.qmp.execute("human-monitor-command", {"command-line": f'qemu-io -d '
                           f'/machine/peripheral/vdisk0/virtio-backend "{command}"'})
        in_overlay = "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {
            "driver": "file", "filename": top["file"]}})
        process.run(["qemu-io", "-U", "-r", "-c", "read -P 0x5a 60M 64k", in_overlay],
                    timeout=60)
        lines = running.result()
    assert len(lines) >= before
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == chain
    assert list((work / "overlays").iterdir()) == []
    after = vm.wait_counter(vm.counter() + 5)
    vm.power_off_cleanly(timeout=60)
    # The write made during the backup is in the qcow2 on the device, and so is every line.
    process.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x5a 60M 64k", image],
                timeout=60)
    info = json.loads(process.run(["qemu-img", "info", "--output=json", image],
                                  timeout=60).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    disk = read_disk(image, tmp_path / "after.raw")
    assert disk.state is FsState.CLEAN and disk.continuous
    assert len(disk.lines) >= after > len(lines)


def wait_for_overlay(vm: DemoVM, running: concurrent.futures.Future,
                     timeout: float = 300.0) -> dict:
    """The parent's overlay (query-block's node), once the fork made it the disk's top (the
    backup still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not running.done():
        [top] = [b["inserted"] for b in vm.qmp.execute("query-block")]
        if top["file"].endswith(".qcow2"):
            return top
        time.sleep(0.05)
    running.result()  # its failure, if it failed
    raise AssertionError("the fork never put an overlay on the parent's disk")


def test_a_read_only_device_is_refused_and_image_mode_reads_the_device(vm_on_device,
                                                                        tmp_path, borg_repo):
    vm, loop, raw = vm_on_device("drive")
    before = vm.wait_counter(10)
    overlays = tmp_path / "overlays"  # --overlay-dir: made 0700 on first use
    backup = ("backup", "--qmp", str(vm.paths.backup_qmp), "--workdir",
              str(tmp_path / "work"), "--overlay-dir", str(overlays), "--borg",
              str(borg_repo), "--mode", "image", "--json")
    process.run(["blockdev", "--setro", loop], timeout=30)
    try:
        refused = kvmsnap(*backup)
    finally:
        process.run(["blockdev", "--setrw", loop], timeout=30)
    assert_one_line_error(refused, f"block device {loop}", "read-only", "blockdev --setrw")
    assert not [e for e in vm.qmp.events() if e.name == "STOP"]  # never paused

    done = kvmsnap(*backup)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["clean"]
    out = tmp_path / "extract"
    borg_extract(borg_repo, report["archives"][0]["name"], out)
    image = out / "vdisk0.raw"
    assert image.stat().st_size == raw.stat().st_size
    disk = read_disk(image, image)  # the frozen device as the clone shut it down
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) >= before
    assert disk.marker == f"clean shutdown after line {len(disk.lines)}"
    assert list(overlays.iterdir()) == [] and overlays.stat().st_mode & 0o777 == 0o700
    vm.wait_counter(vm.counter() + 3)  # the parent runs on


@pytest.mark.parametrize("restarted", [False, True], ids=["unchanged", "ran-again"])
def test_recover_commits_into_the_device_offline_unless_it_changed(vm_on_device, tmp_path,
                                                                  restarted):
    """kvmsnap and then the parent are killed mid-backup (a host going down): `kvmsnap
    recover` folds the overlay into the device with qemu-img, unless the device changed
    since the fork (the VM was started again on it), which it refuses, keeping both."""
    vm, loop, raw = vm_on_device("drive")
    vm.wait_counter(5)
    work = tmp_path / "work"
    try:
        killed = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir", str(work),
                         env={"KVMSNAP_FAULT": "archiving"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        [overlay] = (work / "overlays").iterdir()
        # A write the parent makes after the fork: it reaches the overlay, not the device.
        for command in ("write -P 0x5a 60M 64k", "flush"):  # flushed, as a guest's sync
            vm.qmp.execute("human-monitor-command",
                           {"command-line": f'qemu-io disk0 "{command}"'})
        [journal] = state_dir().glob("*.json")
        os.kill(int(json.loads(journal.read_text())["qsd"].split(":")[0]), signal.SIGKILL)
        os.kill(vm.pid, signal.SIGKILL)
        vm.wait_exit(30)
        if restarted:  # the VM, started again from its command line, writes to its device
            process.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 4k", loop],
                        timeout=60)
        done = kvmsnap("recover", "--json")
        [result] = json.loads(done.stdout)
        if restarted:
            [problem] = result["problems"]
            assert f"{loop} changed after the fork" in problem, problem
            assert overlay.exists() and read_at(raw, 60 << 20, 4) != b"\x5a" * 4
            overlay.unlink()  # the owner decides the restarted VM wins
            assert kvmsnap("recover").returncode == 0
        else:
            assert done.returncode == 0 and result["problems"] == [], done.stderr[-2000:]
            assert any("offline" in line for line in result["actions"]), result
            assert not overlay.exists()
            assert read_at(raw, 60 << 20, 64 << 10) == b"\x5a" * (64 << 10)
        assert not list(state_dir().glob("*.json"))
        assert our_loops(tmp_path) == [line for line in loop_devices() if str(raw) in line]
    finally:
        if list(state_dir().glob("*.json")):
            kvmsnap("recover", "--force")


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def test_a_libvirt_domain_on_a_block_device_is_backed_up_and_keeps_its_definition(
        libvirtd, demo_guest, tmp_path, borg_repo):
    """``<disk type='block'>``: libvirt's disk-only snapshot puts kvmsnap's overlay file on
    the device, blockCommit gives it back, and libvirt's view is the block device again."""
    from libvirt_fixtures import Domain, connect, domain_xml

    raw = tmp_path / "data0.raw"
    make_data_disk(tmp_path / "data0.qcow2", 64, "data0")
    process.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", tmp_path / "data0.qcow2",
                 raw], timeout=120)
    with contextlib.ExitStack() as stack:
        conn = connect(libvirtd)
        stack.callback(conn.close)
        loop = stack.enter_context(loop_device(raw))
        console = tmp_path / "console.log"
        xml = domain_xml(f"kvmsnap-test-{os.getpid()}-block", demo_guest, (loop,), console)
        xml = xml.replace("<disk type='file'", "<disk type='block'").replace(
            "type='qcow2'", "type='raw'").replace(f"<source file='{loop}'",
                                                  f"<source dev='{loop}'")
        dom = conn.defineXML(xml)
        stack.callback(dom.undefine)
        dom.create()
        stack.callback(lambda: dom.isActive() and dom.destroy())
        domain = Domain(dom.name(), libvirtd, dom, (loop,), console)
        domain.wait_console("KVMSNAP-READY", 60)
        before = domain.wait_counter(10)
        lines = archived_lines(borg_repo, tmp_path / "extract", "vda", "--domain",
                               domain.name, "--libvirt-uri", libvirtd,
                               "--workdir", str(tmp_path / "work"))
        assert len(lines) >= before
        assert domain.blklist() == [("vda", str(loop))]
        inactive = ET.fromstring(domain.virsh("dumpxml", "--inactive", domain.name))
        [disk] = inactive.findall("./devices/disk")
        assert disk.get("type") == "block" and disk.find("source").get("dev") == str(loop)
        assert list((tmp_path / "work" / "overlays").iterdir()) == []
        after = domain.wait_counter(domain.counter() + 3)
        domain.shut_down()
        contents = read_disk(raw, raw)
        assert contents.state is FsState.CLEAN and contents.continuous
        assert len(contents.lines) >= after > len(lines)
