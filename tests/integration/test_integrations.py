"""kvmsnap inside other tools: a real borgmatic run, and the restic wrapper script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import FsState

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.qemu


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, KVMSNAP=str(BIN / "kvmsnap"), **extra)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    return env


def borgmatic_config(tmp_path: Path, repos: list[Path], qmp: Path, root: Path,
                     images: Path | None = None) -> Path:
    """contrib/borgmatic.yaml's shape: one fork per configuration (``before:
    configuration``), archived paths starting at the VM (``/./``); with ``images``, the raw
    disks through the hooks' ``--images`` instead of the mounted trees."""
    before = REPO / "hooks" / "kvmsnap-borgmatic-before"
    after = REPO / "hooks" / "kvmsnap-borgmatic-after"
    mount_options = f"--name demo --mount-root {root} --workdir {tmp_path / 'work'}"
    hook_options = f"--images {images} " if images else ""
    repositories = "".join(f"    - path: {repo}\n      label: {repo.name}\n" for repo in repos)
    image_options = "read_special: true\nchunker_params: fixed,4194304\n" if images else ""
    config = tmp_path / "borgmatic.yaml"
    config.write_text(f"""
source_directories:
    - {images or root}/./
repositories:
{repositories}numeric_ids: true
{image_options}commands:
    - before: configuration
      when: [create]
      run:
          - {before} {hook_options}--qmp {qmp} {mount_options} --skip-missing
    - after: configuration
      when: [create]
      run:
          - {after} {hook_options}--qmp {qmp}
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


def borg(*args: object) -> str:
    return process.run([str(BIN / "borg"), *args], timeout=300).stdout


def only_archive(repo: Path) -> str:
    [archive] = json.loads(borg("list", "--json", repo))["archives"]
    return f"{repo}::{archive['name']}"


def assert_vm_given_back(vm, tmp_path: Path) -> None:
    """Nothing mounted, and the VM runs on its own image again."""
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert vm.qmp.runstate() == "running"
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == \
        [str(vm.paths.disks[0])]


def test_borgmatic_forks_once_for_two_repositories(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    before = vm.wait_counter(10)
    offsite = tmp_path / "borg-offsite"
    borg("init", "--encryption=repokey", offsite)
    root = tmp_path / "mnt" / "demo"
    config = borgmatic_config(tmp_path, [borg_repo, offsite], vm.paths.backup_qmp, root)
    created = borgmatic(config, "create", "--verbosity", "1")
    assert created.returncode == 0, created.stderr[-3000:]
    archives = [only_archive(repo) for repo in (borg_repo, offsite)]
    # One fork served both repositories: both archives hold the same run of kvmsnap.
    runs = {json.loads(borg("extract", "--stdout", a, "kvmsnap-vm.json"))["run"]
            for a in archives}
    assert len(runs) == 1, runs
    paths = borg("list", "--short", archives[0]).splitlines()
    assert "vdisk0/workload.log" in paths  # from the VM on, thanks to the "/./" marker
    assert not [p for p in paths if p.startswith(str(root).lstrip("/"))], paths
    out = tmp_path / "extract"
    out.mkdir()
    extracted = borgmatic(config, "extract", "--repository", offsite.name, "--archive",
                          "latest", "--destination", str(out))
    assert extracted.returncode == 0, extracted.stderr
    assert_workload(out / "vdisk0", before)
    assert_vm_given_back(vm, tmp_path)


def test_borgmatic_archives_the_raw_disks_through_the_hooks(start_demo, tmp_path, borg_repo):
    vm = start_demo()
    before = vm.wait_counter(10)
    images = tmp_path / "images" / "demo"
    config = borgmatic_config(tmp_path, [borg_repo], vm.paths.backup_qmp,
                              tmp_path / "mnt" / "demo", images=images)
    created = borgmatic(config, "create", "--verbosity", "1")
    assert created.returncode == 0, created.stderr[-3000:]
    assert "file changed" not in created.stderr  # read from a device, not the FUSE view
    archive = only_archive(borg_repo)
    listed = [json.loads(line) for line in
              borg("list", "--json-lines", archive).splitlines()]
    items = {item["path"]: item for item in listed}
    assert items["vdisk0.raw"]["type"] == "-" and items["vdisk0.raw"]["size"] == 64 << 20
    assert json.loads(borg("extract", "--stdout", archive, "kvmsnap-vm.json"))["vm"] == "demo"
    raw = tmp_path / "vdisk0.raw"
    with open(raw, "wb") as handle:
        subprocess.run([str(BIN / "borg"), "extract", "--stdout", archive, "vdisk0.raw"],
                       stdout=handle, check=True, timeout=300)
    disk = read_disk(raw, raw)
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) >= before
    assert list(images.iterdir()) == []  # the after hook took its links away
    assert_vm_given_back(vm, tmp_path)


def test_borgmatic_skips_softly_when_the_vm_is_not_running(tmp_path, borg_repo):
    root = tmp_path / "mnt" / "demo"
    config = borgmatic_config(tmp_path, [borg_repo], tmp_path / "gone.qmp", root)
    created = borgmatic(config, "create")
    assert created.returncode == 0, created.stderr  # exit 75 from the hook: a soft failure
    assert borg("list", "--short", borg_repo).strip() == ""


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
