"""Restores land where users run VMs: a libvirt domain comes back as a new domain that
boots off the network, a restore never writes over a running VM, one disk can be restored
alone (issue #17, items 3 and 4). The 2 GiB measurement is in test_debian_restore.py."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_helpers import assert_one_line_error, kvmsnap

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin.backends.libvirt import connect
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, ForkOptions, FsState
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

if TYPE_CHECKING:
    from libvirt_fixtures import Domain

pytestmark = pytest.mark.qemu
pytest_plugins = ["libvirt_fixtures"]  # the libvirtd and start_domain fixtures

NOTES = ["HOW-TO-BOOT.txt", "boot-argv.json", "kvmsnap-vm.json"]


def only_archive(repo: Path) -> str:
    borg = process.find_program("borg", "borgbackup")
    [name] = [a["name"] for a in json.loads(process.run(
        [borg, "list", "--json", repo], timeout=120).stdout)["archives"]]
    return f"{repo}::{name}"


def continuous(lines: list[str]) -> bool:
    return bool(lines) and lines == [f"line {i}" for i in range(1, len(lines) + 1)]


def test_restoring_over_a_running_vm_is_refused_and_one_disk_restores_alone(
        start_demo, tmp_path, borg_repo):
    vm = start_demo(disks=2)
    before = vm.wait_counter(5)
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--borg", str(borg_repo),
                   "--mode", "image", "--name", "web", "--workdir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-2000:]
    archive = only_archive(borg_repo)
    notes = tmp_path / "notes"

    # Over the VM's own images while it runs: refused, with --force too, nothing written.
    line = assert_one_line_error(kvmsnap("restore", "--borg", archive, "--to", str(notes),
                                         "--in-place", "--force"),
                                 f"{vm.paths.disks[0]} is in use by running process "
                                 f"{vm.proc.pid}", "shut the VM off first")
    assert "restoring over a running VM's disk is refused" in line
    assert_one_line_error(kvmsnap("restore", "--borg", archive, "--to", str(notes),
                                  "--in-place"), "--in-place overwrites", "--force")
    assert not notes.exists() or list(notes.iterdir()) == []
    vm.wait_counter(vm.counter() + 2)  # it ran on, untouched

    # One disk alone, as raw; the directory then holds it, and a second restore is refused.
    one = tmp_path / "one"
    done = kvmsnap("restore", "--borg", archive, "--to", str(one), "--disk", "vdisk1",
                   "--format", "raw", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [d["device"] for d in json.loads(done.stdout)["disks"]] == ["vdisk1"]
    assert sorted(p.name for p in one.iterdir()) == sorted([*NOTES, "vdisk1.raw"])
    disk = read_disk(one / "vdisk1.raw", tmp_path / "scratch.raw")
    assert disk.state is FsState.CLEAN and continuous(disk.lines) and len(disk.lines) >= before
    assert_one_line_error(kvmsnap("restore", "--borg", archive, "--to", str(one)),
                          f"{one} is not empty", "--force")

    # Shut off, and told so: the VM's own images are restored in place.
    vm.power_off_cleanly()
    final = [read_disk(image, tmp_path / "scratch.raw") for image in vm.paths.disks]
    done = kvmsnap("restore", "--borg", archive, "--to", str(notes), "--in-place", "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    for image, after_shutdown in zip(vm.paths.disks, final, strict=True):
        restored = read_disk(image, tmp_path / "scratch.raw")
        assert restored.state is FsState.CLEAN and continuous(restored.lines)
        # the backup's lines: fewer than the VM wrote by its shut-down
        assert before <= len(restored.lines) < len(after_shutdown.lines)


def backup_domain(domain: Domain, tmp_path: Path, repo: Path) -> str:
    job = BackupJob(domain.name, None, ForkOptions(workdir=tmp_path / "work"),
                    (ArchiveTarget("borg", "borg", "image", {"repository": str(repo)}),),
                    domain=domain.name, libvirt_uri=domain.uri)
    report = backup(job, Hooks(plugin_manager(entry_points=False)))
    assert report.clean, report
    return only_archive(repo)


def wait_for(pattern: str, path: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} in {path} within {timeout:g} s: {text[-800:]}")
        time.sleep(0.2)


def test_a_libvirt_domain_restores_as_a_new_domain_that_boots_off_the_network(
        start_domain, tmp_path, borg_repo):
    domain = start_domain()
    before = domain.wait_counter(5)
    archive = backup_domain(domain, tmp_path, borg_repo)
    original = ET.fromstring(domain.dom.XMLDesc(0))

    # Under the running domain's own name: refused before anything is restored.
    refused = tmp_path / "refused"
    assert_one_line_error(kvmsnap("restore", "--borg", archive, "--to", str(refused),
                                  "--start", "--name", domain.name, "--force",
                                  "--libvirt-uri", domain.uri),
                          f"libvirt domain {domain.name} exists and is running")
    assert list(refused.iterdir()) == []

    name = f"{domain.name}-restored"
    to = tmp_path / "restored"
    conn = connect(domain.uri)
    try:
        done = kvmsnap("restore", "--borg", archive, "--to", str(to), "--start",
                       "--libvirt-uri", domain.uri)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"libvirt domain {name}: started" in done.stdout
        copy = conn.lookupByName(name)
        assert copy.isActive() and copy.UUIDString() != domain.dom.UUIDString()
        # It came up: init announces READY and its workload counts, in either order (the
        # workload starts before READY is echoed), so wait for each, not one then the other.
        wait_for(r"KVMSNAP-READY", to / "console0.log")
        wait_for(r"KVMSNAP-COUNT \d+", to / "console0.log")
        live = ET.fromstring(copy.XMLDesc(0))
        assert [s.get("file") for s in live.findall("./devices/disk/source")] == [
            str(to / "vda.qcow2")]
        [nic] = live.findall("./devices/interface")
        assert nic.find("link").get("state") == "down"
        assert nic.find("mac").get("address") != \
            original.find("./devices/interface/mac").get("address")
        assert domain.state() == "running" and domain.counter() > before  # the original too
        assert sorted(p.name for p in to.iterdir()) == sorted(
            [*NOTES, "console0.log", "domain.xml", "vda.qcow2"])
        assert f"virsh define {to / 'domain.xml'}" in (to / "HOW-TO-BOOT.txt").read_text()
    finally:
        with_copy_removed(conn, name)
        conn.close()


def with_copy_removed(conn, name: str) -> None:
    import libvirt

    try:
        copy = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if copy.isActive():
        copy.destroy()
    copy.undefine()
