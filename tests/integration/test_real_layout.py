"""A Debian guest laid out like real installs (issue #14): GPT with a BIOS boot partition,
an EFI system partition (vfat) at /boot/efi, swap in use, an ext4 LV at /srv, a btrfs
subvolume at /var/lib/btrfs-data and ext4 in LUKS2 at /secret, besides the ext4 root and
xfs /data. Its workload writes a marker into every data filesystem before the fork, kept
in the page cache; a files backup must hold every marker and exit 0, listing swap and
BIOS boot as skipped by rule; without the LUKS key it exits 1 naming the LUKS volume.

The crash-consistent contrast for the layout's filesystems: a power cut's image of the
running guest shows each of vfat, btrfs, the LV's ext4 and the LUKS volume's ext4 dirty,
kvmsnap's backup shows each clean.

One guest boots per module; the tests run in file order on it.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import kvmsnap

from kvmsnap_demo.debian import DebianVM, RealisticGuest, realistic_vm
from kvmsnap_demo.debian.realistic import (
    DATA_MOUNTPOINTS,
    LAYOUT_FILESYSTEMS,
    LAYOUT_WORKLOAD,
    MARKER_FILE,
    layout_verdicts,
    marker_text,
    markers,
)
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import FsState

pytestmark = pytest.mark.qemu

BOOT_BOUND = 300.0  # seconds from QEMU start to KVMSNAP-READY under a loaded TCG host
MARKER = re.compile(r"kvmsnap marker of (\S+), boot ([0-9a-f-]{36})\n")
#: the layout disk (vdb) as kvmsnap names its partitions
BIOS_BOOT, EFI, SWAP, LVM, BTRFS, LUKS = (f"vdisk1/p{n}" for n in range(1, 7))


@dataclass(frozen=True)
class Booted:
    vm: DebianVM
    guest: RealisticGuest
    boot_seconds: float


@pytest.fixture(scope="module")
def booted(realistic_debian_guest: RealisticGuest, accel: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """The realistic guest, running its workload; QEMU is always ended after the module."""
    workdir = tmp_path_factory.mktemp("realistic")
    started = time.monotonic()
    with realistic_vm(realistic_debian_guest, accel, workdir) as vm:
        vm.wait_ready(timeout=BOOT_BOUND)
        yield Booted(vm, realistic_debian_guest, time.monotonic() - started)
        vm.shutdown(powerdown_timeout=0)  # its overlays are thrown away: no need to wait


def backup(booted: Booted, tmp_path: Path, repo: Path,
           *extra: str) -> subprocess.CompletedProcess:
    return kvmsnap("backup", "--qmp", str(booted.vm.paths.backup_qmp), "--borg", str(repo),
                   "--workdir", str(tmp_path / "work"), "--json", *extra)


def archived_markers(repo: Path, report: dict) -> dict[str, str]:
    """Mount point -> boot id of every workload marker in the run's files archive, wherever
    in the archive's tree it is."""
    borg = process.find_program("borg", "borgbackup")
    archive = f"{repo}::{next(a['name'] for a in report['archives'] if a['kind'] == 'files')}"
    paths = process.run([borg, "list", "--format", "{path}{NL}", archive],
                        timeout=600).stdout.splitlines()
    wanted = [p for p in paths if p.rsplit("/", 1)[-1] == MARKER_FILE]
    assert wanted, paths  # (no path at all would extract the whole archive)
    # one borg run for them all (each run costs seconds): each marker is one whole line
    text = process.run([borg, "extract", "--stdout", archive, *wanted], timeout=300).stdout
    found = [match.group(1, 2) for match in MARKER.finditer(text)]
    assert "".join(marker_text(*f) for f in found) == text and len(found) == len(wanted), \
        (wanted, text)
    return dict(found)


def test_guest_really_uses_the_layout(booted: Booted):
    console = booted.vm.plain_console()
    written = markers(console)
    assert sorted(written) == sorted(DATA_MOUNTPOINTS)
    assert written["/"][:2] == ("/dev/vda1", "ext4")
    assert written["/data"][:2] == ("/dev/vda2", "xfs")
    assert written["/boot/efi"] == ("/dev/vdb2", "vfat", "part")
    assert written["/srv"] == ("/dev/mapper/kvmsnap--vg-srv", "ext4", "lvm")
    assert written["/var/lib/btrfs-data"] == ("/dev/vdb5", "btrfs", "part")
    assert written["/secret"] == ("/dev/mapper/secret", "ext4", "crypt")
    assert re.findall(r"KVMSNAP-SWAP (\S+)", console) == ["/dev/vdb3"]
    assert booted.boot_seconds < BOOT_BOUND
    print(f"realistic guest: ready in {booted.boot_seconds:.0f} s; "
          f"its layout was built in {booted.guest.build_seconds:.0f} s")


def test_files_backup_archives_every_filesystem_clean_where_a_power_cut_leaves_them_dirty(
        booted: Booted, tmp_path, borg_repo):
    """The crash-consistent contrast, judged by kvmsnap's own verdict code (disks/verify.py)
    both ways: a power cut's image of the running guest's layout disk (``crash_copy``: the
    guest paused, its disk copied as QEMU had written it) and kvmsnap's backup a moment
    later, whose clone shut down cleanly.

    Each filesystem is dirty for as long as it is mounted read-write: vfat's boot-sector
    dirty bit and ext4's needs_recovery are set at mount; btrfs names a log tree
    (``log_root``) from an fsync until the next commit (600 s here), and the layout's
    workload fsyncs its btrfs log twice a second, so only the 0.5 s after a commit would
    show it clean. Measured: 20 power-cut copies of the running guest at random instants
    (0.5 to 6 s apart): vfat dirty 20/20, btrfs dirty 20/20. Hence every verdict is
    asserted."""
    guest = booted.guest
    booted.vm.wait_console(LAYOUT_WORKLOAD, 120)
    crash = booted.vm.crash_copy(1, tmp_path / "power-cut.raw")
    with ThreadPoolExecutor(1) as meanwhile:  # two libguestfs appliances: at once
        judging = meanwhile.submit(layout_verdicts, guest, crash, "raw", tmp_path / "crash-work")
        done = backup(booted, tmp_path, borg_repo,
                      "--luks-key", f"{guest.luks_uuid}={guest.key_file}")
        power_cut = judging.result()
    crash.unlink()
    print(done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    clone = {f"{v['disk']}/{v['partition']}": v for v in report["verdicts"]}
    for mountpoint, where in LAYOUT_FILESYSTEMS.items():
        print(f"{mountpoint} ({where}): power cut: {power_cut[where].detail}; "
              f"kvmsnap: {clone[where]['detail']}")
    assert [power_cut[w].fstype for w in LAYOUT_FILESYSTEMS.values()] == \
        ["vfat", "ext4", "btrfs", "ext4"]
    for where in LAYOUT_FILESYSTEMS.values():
        assert power_cut[where].state is FsState.NEEDS_RECOVERY, power_cut[where]
        assert clone[where]["state"] == FsState.CLEAN.value, clone[where]
    parts = {p["where"]: p for p in report["partitions"]}
    assert (parts[BIOS_BOOT]["kind"], parts[BIOS_BOOT]["outcome"]) == \
        ("bios-boot", "skipped-by-rule")
    assert (parts[SWAP]["kind"], parts[SWAP]["outcome"]) == ("swap", "skipped-by-rule")
    assert not [p for p in report["partitions"] if p["outcome"] == "not-archived"]
    assert report["warnings"] == []

    boots = archived_markers(borg_repo, report)
    assert sorted(boots) == sorted(DATA_MOUNTPOINTS)  # every one, buffered at the fork
    assert len(set(boots.values())) == 1  # all from the one boot of this test


def test_without_the_luks_key_the_luks_volume_is_named_not_archived(booted: Booted,
                                                                     tmp_path, borg_repo):
    done = backup(booted, tmp_path, borg_repo)
    print(done.stderr[-3000:])
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout)
    parts = {p["where"]: p for p in report["partitions"]}
    assert (parts[LUKS]["kind"], parts[LUKS]["outcome"]) == ("luks", "not-archived")
    named = [line for line in done.stderr.splitlines() if "NOT ARCHIVED" in line]
    assert named and all(LUKS in line for line in named), done.stderr[-3000:]
    boots = archived_markers(borg_repo, report)
    assert sorted(boots) == sorted(set(DATA_MOUNTPOINTS) - {"/secret"})

