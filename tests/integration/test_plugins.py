"""Third-party plugins: discovered through the `kvmsnap` entry-point group, called in order."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kvmsnap_plugin.config import load_config
from kvmsnap_plugin.errors import SkipBackup
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "contrib" / "sample-plugin"

pytestmark = pytest.mark.qemu


@pytest.fixture
def sample_plugin_installed(tmp_path, monkeypatch):
    """The sample plugin really installed (pip) into a directory put on sys.path."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(SAMPLE)],
                   check=True, timeout=300, capture_output=True)
    monkeypatch.syspath_prepend(str(site))
    log = tmp_path / "calls.log"
    monkeypatch.setenv("KVMSNAP_TARBALL_LOG", str(log))
    yield log
    sys.modules.pop("kvmsnap_tarball", None)


def config_for(vm, tmp_path: Path) -> Path:
    config = tmp_path / "kvmsnap.toml"
    config.write_text(f"""
[defaults]
workdir = "{tmp_path / 'work'}"

[[vm]]
name = "demo"
qmp = "{vm.paths.backup_qmp}"
archivers = ["tarballs"]

[archiver.tarballs]
type = "tarball"
directory = "{tmp_path / 'tarballs'}"
""")
    return config


def test_entry_point_plugin_is_discovered_and_called_in_order(start_demo, tmp_path,
                                                              sample_plugin_installed):
    hooks = Hooks(plugin_manager())
    assert "tarball" in hooks.archiver_types()  # found through the entry point
    vm = start_demo()
    vm.wait_counter(5)
    [job], _run = load_config(config_for(vm, tmp_path), hooks.archiver_types())
    report = backup(job, hooks)
    calls = sample_plugin_installed.read_text().split("\n")
    assert [c.split()[0] for c in calls if c] == [
        "pre_backup", "snapshot", "post_shutdown", "archive", "cleanup"]
    assert calls[0] == "pre_backup demo disks=1" and calls[2] == "post_shutdown clean filesystems=1"
    [archive] = report.archives
    with tarfile.open(tmp_path / "tarballs" / archive.name) as tar:
        assert "vdisk0/workload.log" in tar.getnames()


def test_a_plugin_veto_skips_softly_and_still_cleans_up(start_demo, tmp_path, monkeypatch,
                                                       sample_plugin_installed):
    monkeypatch.setenv("KVMSNAP_TARBALL_VETO", "maintenance window")
    hooks = Hooks(plugin_manager())
    vm = start_demo()
    [job], _run = load_config(config_for(vm, tmp_path), hooks.archiver_types())
    with pytest.raises(SkipBackup, match="maintenance window") as info:
        backup(job, hooks)
    assert info.value.exit_code == 75
    calls = sample_plugin_installed.read_text().split()
    assert calls[0] == "pre_backup" and calls[-2:] == ["cleanup", "SkipBackup"]
    assert vm.qmp.runstate() == "running"
