"""kvmsnap inside other tools: a real borgmatic run, and the restic wrapper script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmsnap_plugin.host import process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.qemu


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, KVMSNAP=str(BIN / "kvmsnap"), **extra)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def borgmatic_config(tmp_path: Path, repo: Path, qmp: Path, root: Path) -> Path:
    before = REPO / "hooks" / "kvmsnap-borgmatic-before"
    after = REPO / "hooks" / "kvmsnap-borgmatic-after"
    mount_options = f"--name demo --mount-root {root} --workdir {tmp_path / 'work'}"
    config = tmp_path / "borgmatic.yaml"
    config.write_text(f"""
source_directories:
    - {root}
repositories:
    - path: {repo}
      label: test
numeric_ids: true
commands:
    - before: action
      when: [create]
      run:
          - {before} --qmp {qmp} {mount_options} --skip-missing
    - after: action
      when: [create]
      run:
          - {after} --qmp {qmp}
    - after: error
      run:
          - {after} --qmp {qmp}
""")
    return config


def borgmatic(config: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "borgmatic"), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env=tool_env(),
                          cwd=cwd)


def assert_workload(root: Path, at_least: int) -> None:
    lines = (root / "workload.log").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)] and len(lines) >= at_least
    assert (root / "clean-shutdown").exists()


def test_borgmatic_backs_up_the_running_vm_through_the_hooks(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    before = vm.wait_counter(10)
    root = tmp_path / "mnt" / "demo"
    config = borgmatic_config(tmp_path, borg_repo, vm.paths.backup_qmp, root)
    created = borgmatic(config, "create", "--verbosity", "1")
    assert created.returncode == 0, created.stderr[-3000:]
    listed = borgmatic(config, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    archives = json.loads(listed.stdout)[0]["archives"]
    assert len(archives) == 1
    out = tmp_path / "extract"
    out.mkdir()
    extracted = borgmatic(config, "extract", "--archive", "latest", "--destination", str(out))
    assert extracted.returncode == 0, extracted.stderr
    assert_workload(out / str(root).lstrip("/") / "vdisk0", before)
    # After the run: nothing mounted, the VM runs on its own image again.
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert vm.qmp.runstate() == "running"
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == \
        [str(vm.paths.disks[0])]


def test_borgmatic_skips_softly_when_the_vm_is_not_running(tmp_path, borg_repo):
    root = tmp_path / "mnt" / "demo"
    config = borgmatic_config(tmp_path, borg_repo, tmp_path / "gone.qmp", root)
    created = borgmatic(config, "create")
    assert created.returncode == 0, created.stderr  # exit 75 from the hook: a soft failure
    archives = process.run([str(BIN / "borg"), "list", "--short", borg_repo],
                           timeout=120).stdout
    assert archives.strip() == ""


def test_restic_wrapper_script_backs_up_the_running_vm(start_demo, tmp_path, restic_repo):
    vm = start_demo()
    before = vm.wait_counter(10)
    root = tmp_path / "mnt" / "demo"
    done = subprocess.run(
        [str(REPO / "contrib" / "kvmsnap-restic"), "--qmp", str(vm.paths.backup_qmp),
         "--name", "demo", "--", "--tag", "nightly"],
        capture_output=True, text=True, timeout=600,
        env=tool_env(RESTIC_REPOSITORY=str(restic_repo), KVMSNAP_MOUNT_ROOT=str(root)))
    assert done.returncode == 0, done.stderr[-3000:]
    [snapshot] = json.loads(process.run(["restic", "-r", restic_repo, "snapshots", "--json"],
                                        timeout=120).stdout)
    assert {"kvmsnap", "vm:demo", "nightly"} <= set(snapshot["tags"])
    out = tmp_path / "restore"
    process.run(["restic", "-r", restic_repo, "restore", "latest", "--target", out],
                timeout=300)
    assert_workload(out / str(root).lstrip("/") / "vdisk0", before)
    assert str(root) not in Path("/proc/mounts").read_text()
    assert vm.qmp.runstate() == "running"
