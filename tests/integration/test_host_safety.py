"""The host is safe from what kvmsnap handles as root: a work directory someone else could
swap is refused before the pause, and a guest's raw disk is archived as the raw bytes it
is, even when it holds a qcow2 header naming a host file as backing file."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import assert_one_line_error, kvmsnap

from kvmsnap_plugin.host import process

pytestmark = pytest.mark.qemu

CANARY = b"KVMSNAP-HOST-FILE-CANARY-93be1"


def stops(vm) -> int:
    return len([e for e in vm.qmp.events() if e.name == "STOP"])


def test_a_work_directory_someone_else_could_swap_is_refused_before_the_pause(start_demo,
                                                                              tmp_path):
    vm = start_demo()
    counter = vm.wait_counter(3)
    shared = tmp_path / "x"
    shared.mkdir()
    open_to_all = shared / "work"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    theirs = shared / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    for workdir, problem in ((open_to_all, "is writable by group or others"),
                             (theirs, "is not owned by root")):
        done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--workdir", str(workdir),
                       "--borg", str(tmp_path / "repo"))
        line = assert_one_line_error(done, f"the work directory {workdir} {problem}",
                                     f"chmod 700 {workdir}")
        assert "or remove it" in line
        assert list(workdir.iterdir()) == []
    assert stops(vm) == 0  # never paused
    assert vm.wait_counter(counter + 3) and vm.qmp.runstate() == "running"


def test_a_raw_disk_holding_a_qcow2_header_is_archived_as_its_raw_bytes(start_demo, tmp_path,
                                                                       borg_repo):
    secret = tmp_path / "host-secret"
    secret.write_bytes(CANARY * 4096)
    disk = tmp_path / "guest-raw.img"  # what a guest can write into its own raw disk
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
                 disk, "4M"], timeout=30)
    with open(disk, "r+b") as handle:
        handle.truncate(4 << 20)
    raw_bytes = disk.read_bytes()
    # The clone ignores its power button: the crash-consistent fallback archives the
    # frozen images themselves, this raw disk among them.
    vm = start_demo(power_button="ignore", extra_args=(
        "-drive", f"file={disk},format=raw,if=none,id=rawdisk",
        "-device", "virtio-blk-pci,drive=rawdisk,id=vdisk9"))
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                   str(tmp_path / "work"), "--borg", str(borg_repo), "--mode", "image",
                   "--shutdown-timeout", "4", "--repress-after", "2",
                   "--on-unclean", "crash-consistent", "--json")
    assert done.returncode == 1, done.stderr[-3000:]  # a labelled fallback: a warning
    assert json.loads(done.stdout)["label"] == "crash-consistent"
    out = tmp_path / "extracted"
    out.mkdir()
    listing = process.run([process.find_program("borg", "borgbackup"), "list", "--short",
                           borg_repo], timeout=60).stdout.split()
    for archive in listing:
        process.run([process.find_program("borg", "borgbackup"), "extract",
                     f"{borg_repo}::{archive}"], timeout=600, cwd=out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if CANARY in p.read_bytes()]
    archived = [p for p in files if p.read_bytes()[:4] == b"QFI\xfb"]
    assert len(archived) == 1 and archived[0].read_bytes() == raw_bytes
