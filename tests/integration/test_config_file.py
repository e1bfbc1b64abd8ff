"""A config file driving a real backup: the VM's own name, kept images per VM, and the
command line winning over the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import kvmsnap

pytestmark = pytest.mark.qemu


def test_an_unnamed_vm_takes_qemus_name_and_keeps_its_images_apart(start_demo, tmp_path,
                                                                   borg_repo):
    vm = start_demo()  # -name kvmsnap-demo; its QMP socket's stem is not that
    vm.wait_counter(3)
    assert vm.paths.backup_qmp.stem != "kvmsnap-demo"
    config = tmp_path / "kvmsnap.toml"
    config.write_text(f"""
[defaults]
keep = "{tmp_path / 'keep'}"
mode = "image"
shutdown_timeout = 1

[[vm]]
qmp = "{vm.paths.backup_qmp}"
archivers = ["local"]

[archiver.local]
type = "borg"
repository = "{borg_repo}"
""")
    # the command line wins over [defaults]: files, and a shutdown timeout the guest meets
    done = kvmsnap("backup", "--config", str(config), "--mode", "files",
                   "--shutdown-timeout", "300", "--workdir", str(tmp_path / "work"), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["vm"] == "kvmsnap-demo" and report["shutdown"]["clean"]
    [archive] = report["archives"]
    assert archive["kind"] == "files" and archive["name"].startswith("kvmsnap-demo-")
    assert [Path(p).parent for p in report["kept"]] == [tmp_path / "keep" / "kvmsnap-demo"]
    assert (tmp_path / "work" / "mnt").exists()  # --workdir won too
