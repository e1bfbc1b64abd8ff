"""`kvmsnap verify`'s pure parts: its config keys, the files-archive checks, the boot's
command line, the sparse copy, and the guest agent's sync."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmsnap_plugin.config import load_config
from kvmsnap_plugin.errors import ArchiveError, UsageError, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import (
    CloneDisk,
    FsState,
    RecordedDisk,
    Verdict,
    VerifyReport,
    VerifySettings,
    VmRecord,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.restore_stream import write_image
from kvmsnap_plugin.run.verify import _boot, plan_boot, render
from kvmsnap_plugin.run.verify_fetch import Fetched, archive_pattern, latest_borg_archive
from kvmsnap_plugin.run.verify_files import check_files
from kvmsnap_plugin.vm.guest_agent import GuestAgent

TYPES = Hooks(plugin_manager(entry_points=False)).archiver_types()
CONFIG = """
[archiver.b]
type = "borg"
repository = "/srv/borg"
[[vm]]
name = "web"
qmp = "/run/web.qmp"
archivers = ["b"]
verify = true
"""


def record(label: str = "clean") -> VmRecord:
    return VmRecord("web", "RUN", "2026-01-01T00:00:00+00:00", label, "file",
                    ["/usr/bin/qemu-system-x86_64", "-m", "512",
                     "-drive", "file=/srv/web.qcow2,format=qcow2,if=virtio",
                     "-netdev", "tap,id=n0,ifname=tap0", "-device", "virtio-net,netdev=n0",
                     "-serial", "file:/var/log/web.log", "-qmp", "unix:/run/web.qmp,server"],
                    [RecordedDisk("vdisk0", "/srv/web.qcow2", "qcow2", 1 << 30)])


def test_verify_true_needs_an_image_archive(tmp_path):
    path = tmp_path / "kvmsnap.toml"
    path.write_text(CONFIG)
    with pytest.raises(UsageError, match="verify = true needs an image archive"):
        load_config(path, TYPES)
    path.write_text(CONFIG + 'mode = "both"\nverify_command = ["true"]\nverify_timeout = 90\n')
    [job], _ = load_config(path, TYPES)
    assert job.verify == VerifySettings(True, ("true",), "", 90.0)


def test_a_bad_console_pattern_is_refused_in_one_line():
    with pytest.raises(UsageError, match="is no regex"):
        VerifySettings(console="login:(")


def test_a_files_archive_needs_every_disk_non_empty_and_its_markers():
    listing = {"kvmsnap-vm.json": 10, "vdisk0": -1, "vdisk0/p1": -1, "vdisk0/p1/etc": -1,
               "vdisk0/p1/etc/hostname": 4, "vdisk0/p2": -1}
    fetched = Fetched(record(), "repo::web-files", "files", listing=listing)
    report = check_files(fetched, VerifySettings(files=("vdisk0/p1/etc/hostname",)))
    assert report.reason == "vdisk0/p2 is empty"
    assert (report.exit_code, report.status) == (1, "incomplete")  # verified: bad news
    listing["vdisk0/p2/data"] = 5
    assert check_files(fetched, VerifySettings(files=("/vdisk0/p1/etc/hostname",))).exit_code == 0
    report = check_files(fetched, VerifySettings(files=("vdisk0/p1/etc/passwd",)))
    assert report.reason == "marker file vdisk0/p1/etc/passwd is missing"
    assert (report.exit_code, report.status) == (1, "incomplete")
    fetched.record = record("crash-consistent")
    report = check_files(fetched, VerifySettings())
    assert (report.exit_code, report.status) == (1, "crash-consistent")


CLEAN = Verdict("vdisk0", "p1", "ext4", FsState.CLEAN, "clean")
UP = {"booted": True, "came_up": True, "shut_down_clean": True, "verdicts": [CLEAN]}


@pytest.mark.parametrize(("found", "status", "code"), [
    (UP, "ok", 0),
    ({}, "did-not-boot", 1),  # QEMU ran, the guest never printed, nor answered
    ({"booted": True, "failed": True}, "did-not-come-up", 1),
    ({**UP, "shut_down_clean": False}, "unclean-shutdown", 1),
    ({**UP, "verdicts": [CLEAN, Verdict("vdisk0", "p2", "xfs", FsState.NEEDS_RECOVERY, "log")]},
     "filesystem-not-clean", 1),
    ({**UP, "label": "crash-consistent"}, "crash-consistent", 1),
    ({"unverifiable": True}, "unverifiable", 2),  # QEMU did not start: not the backup's news
])
def test_an_image_verification_exits_1_when_not_proven_and_2_when_it_could_not_run(
        found, status, code):
    report = VerifyReport("web", "repo::web-image", "image", **found)
    assert (report.status, report.exit_code) == (status, code)
    assert report.as_dict()["status"] == status and report.as_dict()["exit_code"] == code
    shown = render(report).splitlines()[-1]
    assert shown.startswith({0: "result: ok", 1: f"result: NOT PROVEN ({status})",
                             2: "result: COULD NOT VERIFY"}[code])


def test_the_boot_is_a_clone_of_the_record_that_boots(tmp_path):
    overlay = CloneDisk("vdisk0", tmp_path / "verify-vdisk0.qcow2", tmp_path / "vdisk0.raw",
                        "raw")
    plan = plan_boot(record(), [overlay], tmp_path, tmp_path / "sockets")
    shown = " ".join(plan.argv)
    assert f"file={overlay.overlay},format=qcow2" in shown
    assert "tap" not in shown and "restrict=on" in shown  # cut off the network
    assert f"file:{tmp_path / 'console.log'}" in shown  # the console captured
    assert "/run/web.qmp" not in shown and str(plan.qmp) in shown  # its own QMP
    assert "-incoming" not in plan.argv and "-S" in plan.argv  # booted, not loaded
    assert plan.agent is None


def test_a_restic_disk_becomes_a_sparse_raw_file_with_holes_where_blocks_are_zero(tmp_path):
    # verify materialises a restic disk as restore does: streamed into the image, no copy
    data = b"x" * 512 + bytes(8 << 20) + b"y" * 512
    dump = [sys.executable, "-c", "import sys; w = sys.stdout.buffer.write; "
            "w(b'x' * 512); w(bytes(8 << 20)); w(b'y' * 512)"]
    copy = write_image(dump, tmp_path / "disk.raw", "raw", len(data), timeout=60)
    assert copy.read_bytes() == data
    assert copy.stat().st_blocks * 512 < 4 << 20


def test_the_agent_is_synced_before_it_is_asked(tmp_path):
    """Answers to syncs sent before the agent started are skipped; its errors are one line."""
    path = tmp_path / "qga.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def agent() -> None:
        conn, _ = server.accept()
        lines = conn.makefile("rb")
        sync = json.loads(lines.readline().lstrip(b"\xff"))  # 0xFF: a reset first
        conn.sendall(b'\xff{"return": 1}\n' + json.dumps(
            {"return": sync["arguments"]["id"]}).encode() + b"\n")
        assert json.loads(lines.readline())["execute"] == "guest-ping"
        conn.sendall(b'{"return": {}}\n')
        assert json.loads(lines.readline())["execute"] == "guest-exec"
        conn.sendall(b'{"error": {"class": "GenericError", "desc": "not allowed"}}\n')
        conn.close()

    thread = threading.Thread(target=agent)
    thread.start()
    with GuestAgent(path) as client:
        client.wait_ready(time.monotonic() + 10)
        with pytest.raises(VMError, match="the guest agent refused: not allowed"):
            client.run(["true"], 5)
    thread.join()
    server.close()
    assert Path(path).exists()


def test_a_libvirt_record_boots_with_a_fresh_master_key(tmp_path):
    """libvirt's per-run key is gone by the time a backup is verified: QEMU gets one."""
    from test_clone_argv import libvirt_argv

    image = tmp_path / "kvmsnap-exp.qcow2"
    argv = libvirt_argv(image, Path("/run/libvirt/qemu/domain-1-kvmsnap-exp"))
    libvirt = VmRecord("kvmsnap-exp", "RUN", "2026-01-01T00:00:00+00:00", "clean", "file",
                       argv, [RecordedDisk("vda", str(image), "qcow2", 1 << 30)])
    overlay = CloneDisk("vda", tmp_path / "verify-vda.qcow2", tmp_path / "vda.raw", "raw")
    plan = plan_boot(libvirt, [overlay], tmp_path, tmp_path / "sockets")
    key = tmp_path / "master-key.aes"
    assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o777 == 0o600
    assert str(key) in " ".join(plan.argv) and "domain-1-kvmsnap-exp" not in " ".join(plan.argv)


def test_a_command_without_a_guest_agent_channel_cannot_be_verified(tmp_path):
    """Refused before QEMU starts: an error (exit 2), not news about the backup."""
    overlay = CloneDisk("vdisk0", tmp_path / "verify-vdisk0.qcow2", tmp_path / "vdisk0.raw",
                        "raw")
    report = VerifyReport("web", "repo::web-image", "image")
    with pytest.raises(UsageError, match="the VM web has no guest agent channel"):
        _boot(record(), [overlay], VerifySettings(command=("true",)), tmp_path, report)
    assert not report.booted and not list(tmp_path.iterdir())


def test_a_verify_that_cannot_read_its_repository_says_so_in_the_metrics(tmp_path, capsys):
    """Exit 2, and the VM's series (found through the config's [run] metrics_file) says
    it could not be verified: a scheduled verify's alert sees more than a stale success."""
    from kvmsnap_plugin.cli import main

    metrics = tmp_path / "kvmsnap.prom"
    config = tmp_path / "kvmsnap.toml"
    config.write_text(CONFIG.replace("verify = true\n", "") +
                      f'[run]\nmetrics_file = "{metrics}"\n')
    code = main(["verify", "--restic", str(tmp_path / "no-repo"), "--vm", "web",
                 "--config", str(config), "--workdir", str(tmp_path / "work")])
    assert code == 2 and "restic snapshots failed" in capsys.readouterr().err
    text = metrics.read_text()
    assert 'kvmsnap_verify_status{vm="web"} 2.0' in text
    assert 'kvmsnap_last_verify_timestamp_seconds{vm="web"}' in text
    assert "kvmsnap_last_verify_success_timestamp_seconds{" not in text


@pytest.mark.parametrize(("template", "name", "matches"), [
    ("{vm}-{now:%Y-%m-%dT%H:%M:%S}", "web-2026-11-25T02:00:00-image", True),
    ("{vm}-{now:%Y-%m-%dT%H:%M:%S}", "web-2-2026-11-25T02:00:00-image", False),  # web-2's
    ("{vm}-{now:%Y-%m-%dT%H:%M:%S}", "web-2026-11-25T02:00:00-files", False),
    ("{vm}-{now:%Y-%m-%dT%H:%M:%S}", "web-2026-11-25T02:00:00-image-damaged", False),
    ("nightly-{mode}-{vm}.{now:%b%d}", "nightly-image-web.Nov25", True),
    ("nightly-{mode}-{vm}.{now:%b%d}", "nightly-image-webXNov25", False),  # "." is literal
])
def test_the_latest_archive_of_a_vm_is_found_by_its_targets_name_template(
        template, name, matches):
    assert bool(archive_pattern(template, "web", "image").fullmatch(name)) is matches


def test_the_latest_image_archive_of_the_vm_is_picked_from_a_borg_repository(borg_repo,
                                                                              tmp_path):
    borg = process.find_program("borg", "borgbackup")
    (tmp_path / "data").write_text("x")
    for name in ("web-2026-01-01T00:00:00-image", "web-2026-01-02T00:00:00-image",
                 "web-2-2026-01-03T00:00:00-image", "web-2026-01-03T00:00:00-files"):
        process.run([borg, "create", f"{borg_repo}::{name}", "data"], timeout=120,
                    cwd=tmp_path)
    template = "{vm}-{now:%Y-%m-%dT%H:%M:%S}"
    assert latest_borg_archive(str(borg_repo), template, "web", "image") == \
        f"{borg_repo}::web-2026-01-02T00:00:00-image"
    assert latest_borg_archive(str(borg_repo), template, "web", "files").endswith(
        "::web-2026-01-03T00:00:00-files")
    with pytest.raises(ArchiveError, match="holds no image archive of db"):
        latest_borg_archive(str(borg_repo), template, "db", "image")


def test_verify_config_tries_every_vm_and_exits_with_the_worst(tmp_path, capsys):
    """Each [[vm]]'s latest backup; one whose repository cannot be read is `unverifiable`
    (exit 2) in the --json list and in the metrics, and the others are still tried."""
    from kvmsnap_plugin.cli import main

    metrics = tmp_path / "kvmsnap.prom"
    config = tmp_path / "kvmsnap.toml"
    config.write_text(CONFIG.replace("verify = true\n", "").replace(
        "/srv/borg", str(tmp_path / "no-borg")) + f"""
[archiver.r]
type = "restic"
repository = "{tmp_path / 'no-restic'}"
[[vm]]
name = "db"
qmp = "/run/db.qmp"
archivers = ["r"]
mode = "image"
[run]
metrics_file = "{metrics}"
""")
    code = main(["verify", "--config", str(config), "--json", "--workdir", str(tmp_path)])
    reports = json.loads(capsys.readouterr().out)
    assert code == 2
    assert [(r["vm"], r["status"], r["exit_code"]) for r in reports] == [
        ("web", "unverifiable", 2), ("db", "unverifiable", 2)]
    assert "borg list failed" in reports[0]["reason"]
    text = metrics.read_text()
    assert 'kvmsnap_verify_status{vm="web"} 2.0' in text
    assert 'kvmsnap_verify_status{vm="db"} 2.0' in text
    code = main(["verify", "--config", str(config), "--vm", "nobody"])
    assert code == 2 and "no [[vm]] named nobody" in capsys.readouterr().err
    code = main(["verify", "--config", str(config), "--clone-console", str(tmp_path / "c")])
    assert code == 2 and "keeps one VM's console log" in capsys.readouterr().err


@pytest.mark.parametrize(("proved", "warning"), [
    (VerifyReport("web", "s", "image", booted=True, failed=True, reason="the boot failed: X"),
     "verify: not proven (did-not-come-up): the boot failed: X"),
    (VerifyReport("web", "s", "image", reason="QEMU did not start: Y", unverifiable=True),
     "verify: could not verify: QEMU did not start: Y"),
    (ArchiveError("borg extract failed", "check it"), "verify: could not verify: borg extract "
     "failed (fix: check it)"),
    (VerifyReport("web", "s", "image", True, True, True), None),
])
def test_verify_true_makes_a_backup_that_does_not_prove_out_a_warning(monkeypatch, proved,
                                                                       warning):
    """Not proven (1) or not verifiable (2): a warning of the VM's run (exit 1), never its
    failure: the archive exists."""
    from test_metrics import report as backup_report

    from kvmsnap_plugin.model import ArchiveTarget, BackupJob
    from kvmsnap_plugin.run import verify as verify_module

    def verify_borg(archive, settings, workdir):
        assert archive == "/srv/borg::web-image"
        if isinstance(proved, Exception):
            raise proved
        return proved

    monkeypatch.setattr(verify_module, "verify_borg", verify_borg)
    job = BackupJob("web", None, targets=(ArchiveTarget("local-borg", "borg", "both",
                                                        {"repository": "/srv/borg"}),),
                    verify=VerifySettings(True))
    done = verify_module.verify_backup(job, backup_report("web"))
    assert [w for w in done.warnings if w.startswith("verify")] == ([warning] if warning
                                                                     else [])
