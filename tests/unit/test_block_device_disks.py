"""Disks on host block devices: which storage is accepted, where the parent's overlay goes,
the clone's command line, the exposure's driver and libvirt's definition given back."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvmsnap_plugin.backends.libvirt_xml import pointed_back
from kvmsnap_plugin.disks.expose import _protocol
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.fork.engine import parent_overlay_path, plan_fork
from kvmsnap_plugin.model import CloneDisk, ForkedDisk, Parent, ParentDisk
from kvmsnap_plugin.paths import DEFAULT_WORKDIR
from kvmsnap_plugin.vm.clone_argv import rewrite_argv
from kvmsnap_plugin.vm.parent import block_disks, check_disks
from kvmsnap_plugin.vm.qemu_args import parse_argv, parse_blockdev

#: a loop device number no loop device is likely to have: no sysfs entry, not read-only
UNUSED_LOOP = os.makedev(7, 250)


def block_node(path: Path) -> Path:
    """A block device node (as root; it is only ever stat()ed, never opened)."""
    os.mknod(path, stat.S_IFBLK | 0o600, UNUSED_LOOP)
    return path


def query_block(filename: str, fmt: str = "raw") -> list[dict]:
    """A QMP query-block answer for one writable disk on ``filename``."""
    return [{"device": "", "qdev": "/machine/peripheral/vdisk0/virtio-backend",
             "inserted": {"node-name": "disk0", "file": filename, "drv": fmt, "ro": False,
                          "encrypted": False,
                          "image": {"filename": filename, "format": fmt,
                                    "virtual-size": 64 << 20}}}]


def test_a_writable_block_device_is_accepted(tmp_path):
    device = block_node(tmp_path / "lv")
    [disk] = block_disks(query_block(str(device)))
    assert disk.host_device and disk.filename == str(device)
    check_disks("web", [disk])  # no error
    [image] = block_disks(query_block(str(tmp_path / "web.raw")))
    assert not image.host_device  # a file (even one that does not exist) is no device


@pytest.mark.parametrize(("filename", "protocol"), [
    ("json:{\"driver\": \"raw\", \"file\": {\"driver\": \"rbd\", \"pool\": \"vms\", "
     "\"image\": \"web\"}}", "rbd"),
    ("nbd+unix:///web?socket=/run/nbd.sock", "nbd"),
    ("nbd://10.0.0.5:10809/web", "nbd"),
    ("iscsi://10.0.0.5/iqn.2024-01.org.example:web/0", "iscsi"),
])
def test_network_protocols_are_refused_by_name(filename, protocol):
    [disk] = block_disks(query_block(filename))
    with pytest.raises(VMError) as refused:
        check_disks("web", [disk])
    message = refused.value.one_line()
    assert f"is on the {protocol} protocol" in message
    assert "map a network volume on the host" in message and "\n" not in message


def test_the_parent_overlay_of_a_block_device_never_goes_into_dev(tmp_path):
    lv = ParentDisk("vda", "n0", "/dev/vg0/data", "raw", 1 << 30, False, ("/dev/vg0/data",),
                    host_device=True)
    other = ParentDisk("vdb", "n1", "/dev/vg1/data", "raw", 1 << 30, False,
                       ("/dev/vg1/data",), host_device=True)
    image = ParentDisk("vdc", "n2", "/images/web.qcow2", "qcow2", 1 << 30, False,
                       ("/images/web.qcow2",))
    work = tmp_path / "work"
    assert parent_overlay_path(lv, "R", None, work) == work / "overlays/vg0-data.kvmsnap-R.qcow2"
    assert parent_overlay_path(lv, "R", None) == DEFAULT_WORKDIR / "overlays" / \
        "vg0-data.kvmsnap-R.qcow2"
    assert parent_overlay_path(lv, "R", tmp_path / "o", work) == \
        tmp_path / "o/vg0-data.kvmsnap-R.qcow2"
    assert parent_overlay_path(image, "R", None, work) == \
        Path("/images/web.qcow2.kvmsnap-R.qcow2")  # files: beside the image, as before
    parent = Parent(None, 1, "web", (), (7, 2, 0), (lv, other, image))
    overlays = [d.parent_overlay for d in plan_fork(parent, "R", None, work)]
    assert len(set(overlays)) == 3 and not any(str(o).startswith("/dev") for o in overlays)


def test_a_host_device_blockdev_becomes_a_file_node_on_the_clone_overlay(tmp_path):
    lv = ParentDisk("vda", "n0", "/dev/vg0/data", "raw", 1 << 30, False, ("/dev/vg0/data",),
                    host_device=True)
    clone = CloneDisk("vda", tmp_path / "clone-vda.qcow2", Path("/dev/vg0/data"), "raw")
    for argv in (["qemu", "-blockdev", "driver=host_device,filename=/dev/vg0/data,"
                                       "node-name=f0",
                  "-blockdev", "driver=raw,file=f0,node-name=d0"],
                 ["qemu", "-blockdev", json.dumps({
                     "driver": "raw", "node-name": "d0",
                     "file": {"driver": "host_device", "filename": "/dev/vg0/data"}})]):
        out = rewrite_argv(argv, [lv], [clone], tmp_path / "clone.sock", None)
        specs = [parse_blockdev(o.value) for o in parse_argv(out)[1] if o.name == "blockdev"]
        files = [s if "filename" in s else s["file"] for s in specs if "filename" in s
                 or isinstance(s.get("file"), dict)]
        assert files and all(f["driver"] == "file" and f["filename"] == str(clone.overlay)
                             for f in files)
        assert [s["driver"] for s in specs if s.get("node-name") == "d0"] == ["qcow2"]


def test_the_exposure_opens_a_block_device_with_host_device(tmp_path):
    assert _protocol(block_node(tmp_path / "lv")) == "host_device"
    (tmp_path / "web.raw").touch()
    assert _protocol(tmp_path / "web.raw") == "file"


def test_an_offline_recovery_points_a_block_disk_back_at_its_device():
    lv = ParentDisk("vda", "n0", "/dev/vg0/data", "raw", 1 << 30, False, ("/dev/vg0/data",),
                    host_device=True)
    overlay = "/var/tmp/kvmsnap/overlays/vg0-data.kvmsnap-R.qcow2"
    live = f"""<domain><name>web</name><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{overlay}'/>
        <backingStore type='block'><format type='raw'/><source dev='/dev/vg0/data'/>
        </backingStore><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    xml, changed = pointed_back(live, [ForkedDisk(lv, Path(overlay), "kvmsnap-R-0")])
    assert changed == ["vda"]
    assert "<disk type=\"block\" device=\"disk\"><driver name=\"qemu\" type=\"raw\" />" in xml
    assert "<source dev=\"/dev/vg0/data\" />" in xml
    assert "file=" not in xml and "backingStore" not in xml
