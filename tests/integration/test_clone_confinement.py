"""The clone is confined: the parent's own binary, a clean environment, QEMU's sandbox.

Checked from the outside, in /proc, while a real clone runs under `kvmsnap fork`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import clone_pid, kvmsnap

from kvmsnap_plugin.host import process
from kvmsnap_plugin.vm.confine import sandbox_option

pytestmark = pytest.mark.qemu

CANARY = "s3cr3t-kvmsnap-canary-13b"
SECRETS = {"BORG_PASSPHRASE": "borg-" + CANARY, "RESTIC_PASSWORD": "restic-" + CANARY,
           "BORG_PASSCOMMAND": "echo " + CANARY, "KVMSNAP_TEST_CANARY": CANARY}
FULL_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass
class Seen:
    """The clone, as /proc showed it while it ran."""

    pid: int
    argv: list[str]
    comm: str
    environ: dict[str, str]
    exe: str
    exe_file: tuple[int, int]  # (st_dev, st_ino) of the binary it runs
    seccomp: str  # the Seccomp: mode of its status, once QEMU has set itself up


def seccomp_mode(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return line.split()[1]
    return "?"


def look_at(pid: int) -> Seen:
    proc = Path(f"/proc/{pid}")
    environ = dict(entry.split("=", 1) for entry in
                   (proc / "environ").read_bytes().decode().split("\0") if entry)
    exe = os.stat(proc / "exe")
    seen = Seen(pid, (proc / "cmdline").read_bytes().decode().rstrip("\0").split("\0"),
                (proc / "comm").read_text().strip(), environ, os.readlink(proc / "exe"),
                (exe.st_dev, exe.st_ino), seccomp_mode(pid))
    # Found right after its exec, QEMU may not have installed its filter yet.
    deadline = time.monotonic() + 20
    with contextlib.suppress(FileNotFoundError):  # gone: what was seen is the answer
        while seen.seccomp != "2" and time.monotonic() < deadline:
            time.sleep(0.01)
            seen.seccomp = seccomp_mode(pid)
    return seen


def fork_watching_the_clone(vm, workdir: Path, *args: str):
    """`kvmsnap fork` with secrets in its environment; the clone as seen while it ran."""
    done = {}
    run = threading.Thread(target=lambda: done.update(result=kvmsnap(
        "fork", "--qmp", str(vm.paths.backup_qmp), "--workdir", str(workdir), *args,
        env=SECRETS)))
    run.start()
    seen = None
    try:
        while seen is None and run.is_alive():
            pid = clone_pid(workdir)
            if pid is not None:  # (it may be gone before it is read: keep watching)
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    seen = look_at(pid)
            time.sleep(0.005)
    finally:
        run.join(600)
    assert seen is not None, f"the clone was never seen running: {done['result'].stderr}"
    return done["result"], seen


def qemu_copy(prefix: Path) -> Path:
    """A copy of the system's QEMU installed under ``prefix`` (QEMU looks for its modules and
    firmware relative to its binary: ``prefix/lib``, ``prefix/share`` are the system's)."""
    binary = prefix / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    shutil.copy2(shutil.which("qemu-system-x86_64"), binary)
    for shared in ("lib", "share"):
        (prefix / shared).symlink_to(f"/usr/{shared}")
    return binary


def file_of(pid: int) -> tuple[int, int]:
    info = os.stat(f"/proc/{pid}/exe")
    return info.st_dev, info.st_ino


def test_the_clone_runs_the_parents_binary_sandboxed_with_a_clean_environment(start_demo,
                                                                             tmp_path):
    vm = start_demo()
    vm.wait_counter(3)
    done, clone = fork_watching_the_clone(vm, tmp_path / "work", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    # Nothing of kvmsnap's environment: exactly the clean set.
    assert clone.environ == process.CLEAN_ENV
    # QEMU's seccomp filter is on, with the full set of denials.
    assert clone.seccomp == "2"
    assert clone.argv[clone.argv.index("-sandbox") + 1] == FULL_SANDBOX
    # The parent's own binary, under the parent's readable name.
    assert clone.exe_file == file_of(vm.pid)
    assert clone.exe == os.readlink(f"/proc/{vm.pid}/exe")
    assert clone.argv[0] == vm.argv[0]
    assert clone.comm == Path(f"/proc/{vm.pid}/comm").read_text().strip()
    qemu = vm.qmp.execute("query-version")["qemu"]
    version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
    report = json.loads(done.stdout)["clone_binary"]
    assert report["summary"] == f"{clone.exe} (QEMU {version}, the parent's own); sandboxed"
    assert CANARY not in done.stdout + done.stderr


def test_a_binary_replaced_on_disk_is_not_what_the_clone_runs(start_demo, tmp_path):
    """The parent's file is replaced (an upgrade, or an attacker) after it started: the
    clone still runs the parent's own binary, never the file now at argv[0]."""
    copy = qemu_copy(tmp_path / "qemu")
    vm = start_demo(binary=str(copy))
    vm.wait_counter(3)
    marker = tmp_path / "the-replacement-ran"
    replacement = copy.with_name("replacement")
    replacement.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    replacement.chmod(0o755)
    os.replace(replacement, copy)  # the parent's file is gone; its path runs the script

    done, clone = fork_watching_the_clone(vm, tmp_path / "work")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    assert clone.exe == f"{copy} (deleted)" and clone.exe_file == file_of(vm.pid)
    assert clone.comm == "qemu-system-x86"  # named like the binary, not "exe" or a fd number
    line = next(x for x in done.stdout.splitlines() if "clone binary:" in x)
    assert f"clone binary: {copy} (deleted: replaced on disk since the VM started) (QEMU " \
        in line and "the parent's own); sandboxed" in line


def test_the_clones_sandbox_forbids_spawning(start_demo, tmp_path):
    """The -sandbox value kvmsnap builds from the probe really stops this QEMU from
    starting a program: an exec: migration (QEMU forks a shell) kills it, no file appears."""
    probe = start_demo()
    value, confinement = sandbox_option(probe.qmp, probe.argv)
    assert (value, confinement) == (FULL_SANDBOX, "sandboxed")
    vm = start_demo(extra_args=("-sandbox", value))
    assert seccomp_mode(vm.pid) == "2"
    marker = tmp_path / "spawned"
    with contextlib.suppress(Exception):  # it may die before it answers
        vm.qmp.execute("migrate", {"uri": f"exec:touch {marker}"}, timeout=10)
    assert vm.wait_exit(20), "a sandboxed QEMU survived starting a program"
    assert not marker.exists()
