"""A real distribution guest (Debian, systemd, GPT with ext4 + xfs): forked while its
workload runs, archived, restored from borg and from restic, and booted again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmsnap_demo.debian import debian_vm, read_guest_disk
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, ForkOptions, FsState, ShutdownPolicy
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup
from kvmsnap_plugin.run.restore import restore_borg, restore_restic

pytestmark = pytest.mark.qemu

RECOVERY_AT_BOOT = ("recovery complete", "Starting recovery", "orphan", "needs_recovery")


def continuous(lines: list[str]) -> bool:
    return lines == [f"line {i}" for i in range(1, len(lines) + 1)]


def test_debian_guest_backup_and_restore(start_debian, debian_guest, accel, tmp_path,
                                         borg_repo, restic_repo):
    vm = start_debian()
    before = vm.wait_counter(20)
    job = BackupJob("debian", vm.paths.backup_qmp,
                    ForkOptions(workdir=tmp_path / "work", clone_console=tmp_path / "clone.log",
                                shutdown=ShutdownPolicy(timeout=120)),
                    (ArchiveTarget("borg", "borg", "both", {"repository": str(borg_repo)}),
                     ArchiveTarget("restic", "restic", "image",
                                   {"repository": str(restic_repo)})))
    report = backup(job, Hooks(plugin_manager(entry_points=False)))

    # The clone shut down through systemd, and every filesystem is clean.
    clone = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "clone.log").read_text(errors="replace"))
    for status in ("Power key pressed", "Stopping kvmsnap-workload.service",
                   "Unmounted data.mount", "reboot: Power down"):
        assert status in clone, status
    assert [(v.disk, v.partition, v.fstype, v.state) for v in report.verdicts] == [
        ("vdisk0", "p1", "ext4", FsState.CLEAN), ("vdisk0", "p2", "xfs", FsState.CLEAN)]

    # The files archive holds the buffered lines written before the fork, on both.
    files = next(a for a in report.archives if a.type == "borg" and a.kind == "files")
    out = tmp_path / "files"
    out.mkdir()
    process.run([process.find_program("borg", "borgbackup"), "extract",
                 f"{borg_repo}::{files.name}"], timeout=600, cwd=out)
    for log in (out / "vdisk0/p1/var/lib/kvmsnap-workload/workload.log",
                out / "vdisk0/p2/workload.log"):
        lines = log.read_text().splitlines()
        assert continuous(lines) and len(lines) >= before, log
    assert (out / "kvmsnap-vm.json").exists()

    # Both image backups restore to disks that boot without any filesystem recovery.
    image = next(a for a in report.archives if a.type == "borg" and a.kind == "image")
    restored = [restore_borg(f"{borg_repo}::{image.name}", tmp_path / "from-borg"),
                restore_restic(str(restic_repo), tmp_path / "from-restic", vm="debian")]
    for number, done in enumerate(restored):
        [disk] = done.disks
        assert Path(done.note).read_text().count(disk.path) >= 2  # listed, and in the argv
        with debian_vm(debian_guest, accel, tmp_path / f"boot{number}",
                       disk=Path(disk.path)) as booted:
            booted.wait_ready()
            console = booted.plain_console()
            assert "EXT4-fs (vda1): mounted filesystem" in console
            for message in RECOVERY_AT_BOOT:
                assert message not in console, message
            booted.wait_console(r"KVMSNAP-COUNT \d+", 60)  # it numbers on from the backup
            booted.wait_counter(booted.counter() + 2)
            booted.power_off_cleanly()
        for fs in read_guest_disk(Path(disk.path), tmp_path / f"scratch{number}").values():
            assert fs.state is FsState.CLEAN and fs.continuous and len(fs.lines) > before
