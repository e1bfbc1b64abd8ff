"""`kvmsnap verify`: a backup booted in a sandbox comes up (or says why not), a files
archive holds its trees and marker files, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cli_helpers import kvmsnap
from prometheus_client.parser import text_string_to_metric_families

from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import (
    ArchiveTarget,
    BackupJob,
    ForkOptions,
    ShutdownPolicy,
    VerifySettings,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.fleet import backup_or_plan

pytestmark = pytest.mark.qemu


def backed_up(qmp: Path, tmp_path: Path, *targets: ArchiveTarget, timeout: float = 60,
              verify: VerifySettings | None = None):
    """A backup as a run makes it (with ``verify``: ``verify = true``, verified after)."""
    job = BackupJob("guest", qmp, ForkOptions(workdir=tmp_path / "work",
                                              shutdown=ShutdownPolicy(timeout=timeout)),
                    targets, verify=verify or VerifySettings())
    return backup_or_plan(Hooks(plugin_manager(entry_points=False)))(job)


def verify(tmp_path: Path, *args: str) -> tuple[int, dict]:
    done = kvmsnap("verify", *args, "--workdir", str(tmp_path / "verify-work"), "--json")
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout or "{}")


def assert_nothing_left(tmp_path: Path) -> None:
    work = tmp_path / "verify-work"
    assert not list(work.iterdir()), list(work.iterdir())
    assert str(work) not in Path("/proc/mounts").read_text()
    assert str(work) not in process.run(["losetup", "-a"], timeout=30).stdout
    assert subprocess.run(["pgrep", "-f", str(work)], capture_output=True).returncode == 1


def test_a_demo_backup_verifies_by_its_console_and_its_files(start_demo, tmp_path, borg_repo,
                                                            restic_repo):
    vm = start_demo()
    vm.wait_counter(3)
    restic_files = tmp_path / "restic-files"  # a files-only backup
    process.run(["restic", "init", "-r", restic_files], timeout=120)
    report = backed_up(vm.paths.backup_qmp, tmp_path,
                       ArchiveTarget("borg", "borg", "both", {"repository": str(borg_repo)}),
                       ArchiveTarget("restic", "restic", "image",
                                     {"repository": str(restic_repo)}),
                       ArchiveTarget("restic-files", "restic", "files",
                                     {"repository": str(restic_files)}),
                       verify=VerifySettings(True, console="KVMSNAP-READY"))
    names = {a.kind: a.name for a in report.archives if a.type == "borg"}
    # verify = true: the image archive was booted right after the backup
    assert report.verified.exit_code == 0 and report.verified.came_up, report.verified
    assert report.verified.source == f"{borg_repo}::{names['image']}"
    assert not report.warnings

    by_config = tmp_path / "kvmsnap.toml"  # the weekly timer's way: each VM's latest backup
    by_config.write_text(f'[archiver.b]\ntype = "borg"\nrepository = "{borg_repo}"\n'
                         f'[[vm]]\nname = "guest"\nqmp = "{vm.paths.backup_qmp}"\n'
                         'archivers = ["b"]\nmode = "both"\nverify_console = "KVMSNAP-READY"\n')
    for source in (["--config", str(by_config)],
                   ["--restic", str(restic_repo), "--vm", "guest", "--console", "KVMSNAP-READY"]):
        code, result = verify(tmp_path, *source)
        assert code == 0, result
        if isinstance(result, list):  # --config: a report per VM, of its latest image archive
            [result] = result
            assert result["source"] == f"{borg_repo}::{names['image']}"
        assert result["booted"] and result["came_up"] and result["shut_down_clean"]
        assert result["how"] == "console: KVMSNAP-READY"
        assert [(v["disk"], v["partition"], v["state"]) for v in result["verdicts"]] == [
            ("vdisk0", "", "clean")]
        # sparse: the 64 MiB disk took only what the guest wrote
        assert 0 < result["materialised_bytes"] < 32 << 20
        assert_nothing_left(tmp_path)

    files = f"{borg_repo}::{names['files']}"
    code, result = verify(tmp_path, "--borg", files, "--file", "vdisk0/workload.log",
                          "--file", "vdisk0/clean-shutdown")
    assert code == 0, result
    assert result["mode"] == "files" and "marker vdisk0/workload.log: present" in result["checked"]
    code, result = verify(tmp_path, "--borg", files, "--file", "vdisk0/etc/no-such-marker")
    assert (code, result["status"]) == (1, "incomplete"), result  # verified: bad news
    assert result["reason"] == "marker file vdisk0/etc/no-such-marker is missing"
    code, result = verify(tmp_path, "--restic", str(restic_files), "--file",
                          "vdisk0/clean-shutdown")
    assert code == 0 and result["mode"] == "files", result
    assert "marker vdisk0/clean-shutdown: present" in result["checked"]
    assert_nothing_left(tmp_path)


def damaged_copy(borg_repo: Path, archive: str, tmp_path: Path) -> str:
    """The image archive again, its root filesystem's superblock zeroed, as ARCHIVE-damaged
    in a repository of its own (made while a verify reads ``borg_repo``: a ``borg create``
    there would wait for that verify's lock); returns REPOSITORY::ARCHIVE-damaged."""
    borg = process.find_program("borg", "borgbackup")
    out, repo = tmp_path / "damage", tmp_path / "damaged-repo"
    out.mkdir()
    process.run([borg, "init", "--encryption=repokey", repo], timeout=120)
    process.run([borg, "extract", "--sparse", f"{borg_repo}::{archive}"], timeout=600, cwd=out)
    table = json.loads(process.run(["sfdisk", "--json", out / "vdisk0.raw"],
                                   timeout=30).stdout)
    start = table["partitiontable"]["partitions"][0]["start"] * 512
    with open(out / "vdisk0.raw", "r+b") as disk:
        disk.seek(start + 1024)  # ext4's primary superblock
        disk.write(bytes(1024))
    process.run([borg, "create", f"{repo}::{archive}-damaged", "kvmsnap-vm.json",
                 "vdisk0.raw"], timeout=600, cwd=out)
    return f"{repo}::{archive}-damaged"


def test_a_debian_backup_verifies_through_its_guest_agent(start_debian, tmp_path, borg_repo):
    vm = start_debian(agent=True)
    report = backed_up(vm.paths.backup_qmp, tmp_path,
                       ArchiveTarget("borg", "borg", "image", {"repository": str(borg_repo)}),
                       timeout=180)
    [image] = [a.name for a in report.archives]
    vm.shutdown(powerdown_timeout=0)  # done with the parent: its CPU is the verify's now

    metrics = tmp_path / "kvmsnap.prom"  # a scheduled verify's alert reads these
    with ThreadPoolExecutor(1) as meanwhile:  # borg's work beside the sandbox's boot
        damaging = meanwhile.submit(damaged_copy, borg_repo, image, tmp_path)
        code, result = verify(tmp_path, "--borg", f"{borg_repo}::{image}",
                              "--command", "systemctl is-system-running --wait",
                              "--clone-console", str(tmp_path / "verify.log"),
                              "--metrics", str(metrics))
        damaged = damaging.result()
    assert code == 0, result
    series = metric_values(metrics)
    assert series["kvmsnap_verify_status"] == 0
    assert series["kvmsnap_verify_came_up_seconds"] == result["came_up_s"]
    assert series["kvmsnap_last_verify_success_timestamp_seconds"] == \
        series["kvmsnap_last_verify_timestamp_seconds"] > time.time() - 600
    assert result["how"].startswith("guest agent: systemctl is-system-running --wait exited 0")
    assert result["booted_s"] <= result["came_up_s"] <= result["shut_down_s"]
    assert [(v["disk"], v["partition"], v["state"]) for v in result["verdicts"]] == [
        ("vdisk0", "p1", "clean"), ("vdisk0", "p2", "clean")]
    console = (tmp_path / "verify.log").read_text(errors="replace")
    assert "reboot: Power down" in console
    assert_nothing_left(tmp_path)

    code, result = verify(tmp_path, "--borg", damaged,
                          "--command", "systemctl is-system-running --wait",
                          "--metrics", str(metrics))
    assert (code, result["status"]) == (1, "did-not-come-up"), result  # ran: bad news
    assert result["booted"] and not result["came_up"]
    assert "Failed to mount /dev/vda1 as root file system" in result["reason"], result
    failed = metric_values(metrics)
    assert failed["kvmsnap_verify_status"] == 1
    assert "kvmsnap_verify_came_up_seconds" not in failed
    assert failed["kvmsnap_last_verify_timestamp_seconds"] > \
        failed["kvmsnap_last_verify_success_timestamp_seconds"] == \
        series["kvmsnap_last_verify_success_timestamp_seconds"]  # the last proof stays
    assert_nothing_left(tmp_path)


def metric_values(path: Path) -> dict[str, float]:
    """The guest's samples in a textfile, by name."""
    return {s.name: s.value for f in text_string_to_metric_families(path.read_text())
            for s in f.samples if s.labels.get("vm") == "guest"}
