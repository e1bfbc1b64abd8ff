"""A real distribution guest (Debian, systemd, GPT with ext4 + xfs): forked while its
workload runs, archived, restored from borg and from restic, and booted again."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmsnap_demo.debian import debian_vm, read_guest_disk
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import (
    METADATA_FILE,
    ArchiveTarget,
    BackupJob,
    ForkOptions,
    FsState,
    ShutdownPolicy,
    VmRecord,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup
from kvmsnap_plugin.run.restore import Restored, restore_borg, restore_restic

pytestmark = pytest.mark.qemu

RECOVERY_AT_BOOT = ("recovery complete", "Starting recovery", "orphan", "needs_recovery")


def continuous(lines: list[str]) -> bool:
    return lines == [f"line {i}" for i in range(1, len(lines) + 1)]


def allocated(directory: Path) -> int:
    """Bytes allocated by every file under ``directory`` (hidden and temporary ones too)."""
    total = 0
    for parent, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # replaced meanwhile
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def measured(directory: Path, restore: Callable[[], Restored]) -> tuple[Restored, float, int]:
    """Run ``restore`` into ``directory`` while sampling what it allocates there every
    20 ms: the result, the seconds it took and the peak allocation."""
    peak, stop = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, allocated(directory))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        done = restore()
    finally:
        seconds = time.monotonic() - started
        stop.set()
        sampler.join()
    return done, seconds, max(peak, allocated(directory))


def done_size(done: Restored) -> int:
    return next(d.virtual_size for d in VmRecord.from_json(
        (Path(done.note).parent / METADATA_FILE).read_bytes()).disks)


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

    # Both image backups restore to the same disk, which boots without any filesystem
    # recovery, and restoring the 2 GiB disk never takes more room than the restored image
    # itself (it is streamed into place: no raw copy first).
    vm.shutdown(powerdown_timeout=0)  # done with the parent: its CPU is the boot's now
    image = next(a for a in report.archives if a.type == "borg" and a.kind == "image")
    restored = []
    for source, restore in [
            ("borg", lambda to: restore_borg(f"{borg_repo}::{image.name}", to)),
            ("restic", lambda to: restore_restic(str(restic_repo), to, vm="debian"))]:
        to = tmp_path / f"from-{source}"
        done, seconds, peak = measured(to, lambda restore=restore, to=to: restore(to))
        [disk] = done.disks
        size, final = done_size(done), allocated(to)
        print(f"restore from {source}: {seconds:.1f} s, a {size >> 20} MiB {disk.format} disk, "
              f"{final >> 20} MiB allocated, peak {peak >> 20} MiB")
        assert size == 2 << 30
        assert peak <= final + (16 << 20), (source, peak, final)
        assert Path(done.note).read_text().count(disk.path) >= 2  # listed, and in the argv
        restored.append(Path(disk.path))
    # The guest sees the very same disk from either: what boots from one boots from the
    # other (one boot, not two: a Debian boot under TCG is ~40 s).
    process.run(["qemu-img", "compare", *restored], timeout=600)
    with debian_vm(debian_guest, accel, tmp_path / "boot", disk=restored[0]) as booted:
        booted.wait_ready()
        console = booted.plain_console()
        assert "EXT4-fs (vda1): mounted filesystem" in console
        for message in RECOVERY_AT_BOOT:
            assert message not in console, message
        booted.wait_console(r"KVMSNAP-COUNT \d+", 60)  # it numbers on from the backup
        booted.wait_counter(booted.counter() + 2)
        booted.power_off_cleanly()
    for fs in read_guest_disk(restored[0], tmp_path / "scratch").values():
        assert fs.state is FsState.CLEAN and fs.continuous and len(fs.lines) > before
