"""Secrets stay where they are: none in an archive, a log line or a child's command line,
and no encrypted disk gets plaintext overlays (issue 13, "Permissions and secrets").

The parent carries a secret on its own command line (``-object secret,data=...``: public in
its /proc anyway, but nowhere else), kvmsnap carries the repositories' passphrases in its
environment, and a backup into borg and restic with --debug logging must leak neither.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, clone_pid, kvmsnap

from kvmsnap_demo.testing import BORG_PASSPHRASE, RESTIC_PASSWORD
from kvmsnap_plugin.host import process

pytestmark = pytest.mark.qemu

#: the parent's secret object (an unused one is fine for QEMU)
VM_SECRET = "CANARY1-vm-secret-5f3a9c"
#: a secret kvmsnap has in its environment and hands no child
ENV_CANARY = "CANARY3-env-7d1e02"
CANARIES = (VM_SECRET, ENV_CANARY, BORG_PASSPHRASE, RESTIC_PASSWORD)


class ChildWatch:
    """Every command line of the descendants of one process, polled from a thread."""

    def __init__(self) -> None:
        self.seen: dict[int, bytes] = {}
        self.root: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            if self.root is None:
                continue
            for pid in descendants(self.root):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmdline:  # a zombie's is empty
                    self.seen.setdefault(pid, cmdline)
                    if self.seen[pid] != cmdline:  # execve'd since: keep both
                        self.seen[-pid] = cmdline


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines()
                        if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        children.setdefault(ppid, []).append(int(status.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def backup_watching_children(vm, tmp_path: Path, *options: str) -> tuple[
        subprocess.CompletedProcess, ChildWatch]:
    """`kvmsnap --debug backup` of ``vm`` with a canary in its environment."""
    argv = [sys.executable, "-m", "kvmsnap_plugin.cli", "--debug", "backup", "--qmp",
            str(vm.paths.backup_qmp), "--name", "demo", "--workdir", str(tmp_path / "work"),
            *options]
    with ChildWatch() as watch:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "KVMSNAP_TEST_CANARY": ENV_CANARY})
        watch.root = proc.pid
        stdout, stderr = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout.decode(),
                                       stderr.decode()), watch


def leaks(data: bytes) -> list[str]:
    return [canary for canary in CANARIES if canary.encode() in data]


def borg_bytes(*args: str) -> bytes:
    return subprocess.run([process.find_program("borg", "borgbackup"), *args],
                          capture_output=True, check=True, timeout=600).stdout


def restic_bytes(*args: str) -> bytes:
    return subprocess.run(["restic", *args], capture_output=True, check=True,
                          timeout=600).stdout


def start_with_a_secret(start_demo):
    vm = start_demo(extra_args=("-object", f"secret,id=sec0,data={VM_SECRET},format=raw"))
    vm.wait_counter(3)
    return vm


# -- the end to end check ------------------------------------------------------------------------
def test_no_secret_in_any_archive_log_line_or_child_command_line(start_demo, tmp_path,
                                                                  borg_repo, restic_repo):
    vm = start_with_a_secret(start_demo)
    done, watch = backup_watching_children(vm, tmp_path, "--borg", str(borg_repo),
                                           "--restic", str(restic_repo), "--mode", "both")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run: " in done.stderr and "spawn: " in done.stderr  # --debug logged commands
    assert leaks(done.stderr.encode()) == [] and leaks(done.stdout.encode()) == []

    # every archive and snapshot, byte for byte; the VM record is in them, redacted
    records = []
    for name in json.loads(borg_bytes("list", "--json", str(borg_repo)))["archives"]:
        tar = borg_bytes("export-tar", f"{borg_repo}::{name['name']}", "-")
        assert leaks(tar) == [], name["name"]
        records.append(b"secret,id=sec0,data=<redacted>,format=raw" in tar)
    for snapshot in json.loads(restic_bytes("-r", str(restic_repo), "snapshots", "--json")):
        tar = restic_bytes("-r", str(restic_repo), "dump", snapshot["id"], "/")
        assert leaks(tar) == [], snapshot["paths"]
        records.append(b"secret,id=sec0,data=<redacted>,format=raw" in tar)
    assert records.count(True) == 4  # borg files + image, restic files + metadata
    # and `kvmsnap restore` still says how to boot the restored disk from the redacted record
    restored = kvmsnap("restore", "--restic", str(restic_repo), "--to", str(tmp_path / "out"))
    assert restored.returncode == 0, restored.stderr[-3000:]
    note = (tmp_path / "out" / "HOW-TO-BOOT.txt").read_text()
    assert "secret,id=sec0,data=<redacted>,format=raw" in note
    assert f"filename={tmp_path / 'out' / 'vdisk0.qcow2'}," in note

    # the command lines of kvmsnap's children (borg, restic, qemu-img, the export daemon,
    # mount, ...); the clone's own is checked below
    clone = {pid for pid, cmdline in watch.seen.items() if b"-incoming" in cmdline}
    assert len(clone) == 1 and len(watch.seen) > 5, watch.seen
    assert {pid: leaks(cmdline) for pid, cmdline in watch.seen.items()
            if pid not in clone and leaks(cmdline)} == {}


def test_the_clone_reads_the_parents_secrets_from_a_private_file(start_demo, tmp_path,
                                                                  borg_repo):
    vm = start_with_a_secret(start_demo)
    done, watch = backup_watching_children(vm, tmp_path, "--borg", str(borg_repo))
    assert done.returncode == 0, done.stderr[-3000:]
    [clone] = [cmdline for cmdline in watch.seen.values() if b"-incoming" in cmdline]
    assert b"secret,id=sec0" in clone and leaks(clone) == []


def test_the_dry_run_plan_shows_the_clone_without_secrets(start_demo, tmp_path, borg_repo):
    vm = start_with_a_secret(start_demo)
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "demo", "--borg",
                   str(borg_repo), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    clone_argv = json.loads(done.stdout)["clone_argv"]
    assert re.search(r"secret,id=sec0,format=raw,file=/\S+/secret-sec0", " ".join(clone_argv))
    assert leaks(done.stdout.encode()) == [] and leaks(done.stderr.encode()) == []


# -- encrypted disks -----------------------------------------------------------------------------
def luks_image(path: Path, password: str) -> Path:
    """A LUKS-encrypted qcow2. qemu-img times its key derivation in CPU time and gives up
    ("Unable to get accurate CPU usage") when a busy host measures none: try again."""
    for attempt in range(5):
        done = process.run(["qemu-img", "create", "-f", "qcow2", "--object",
                            f"secret,id=s0,data={password}", "-o",
                            "encrypt.format=luks,encrypt.key-secret=s0", path, "16M"],
                           timeout=60, check=attempt == 4)
        if done.returncode == 0:
            break
    return path


def test_a_luks_encrypted_disk_is_refused_before_the_pause(start_demo, tmp_path, borg_repo):
    image = luks_image(tmp_path / "luks.qcow2", "PW-luks")
    vm = start_demo(extra_args=(
        "-object", "secret,id=luks0,data=PW-luks",
        "-blockdev", json.dumps({"driver": "qcow2", "node-name": "luksdisk",
                                 "encrypt": {"format": "luks", "key-secret": "luks0"},
                                 "file": {"driver": "file", "filename": str(image)}}),
        "-device", "virtio-blk-pci,drive=luksdisk,id=vaultdisk"))
    vm.wait_counter(3)
    vm.qmp.events()
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                   "--workdir", str(tmp_path / "work"), "--borg", str(borg_repo))
    line = assert_one_line_error(done, "disk vaultdisk of", "is encrypted (LUKS)",
                                 "written during the backup unencrypted", "back it up offline")
    assert "PW-luks" not in done.stderr, line
    assert "STOP" not in [e.name for e in vm.qmp.events()]  # never paused
    assert vm.qmp.runstate() == "running" and clone_pid(tmp_path / "work") is None
    assert not list(vm.paths.disks[0].parent.glob("*.kvmsnap-*"))  # no overlay made
