"""A libvirt domain's XML: its disks read, the fork's snapshot XML, the definition fixed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kvmsnap_plugin.backends.libvirt_xml import (
    DomainDisk,
    disk_by_target,
    domain_disks,
    named_by_target,
    pointed_back,
    snapshot_xml,
)
from kvmsnap_plugin.model import ForkedDisk, ParentDisk

LIVE = """<domain type='kvm'><name>web</name><devices>
  <emulator>/usr/bin/qemu-system-x86_64</emulator>
  <disk type='file' device='disk'>
    <driver name='qemu' type='qcow2'/>
    <source file='/img/web.qcow2.kvmsnap-1-2.qcow2' index='2'/>
    <backingStore type='file' index='1'>
      <format type='qcow2'/><source file='/img/web.qcow2'/><backingStore/>
    </backingStore>
    <target dev='vda' bus='virtio'/>
    <alias name='virtio-disk0'/>
  </disk>
  <disk type='block' device='disk'>
    <driver name='qemu' type='raw'/>
    <source dev='/dev/vg/data'/>
    <target dev='vdb' bus='virtio'/>
    <readonly/>
    <alias name='virtio-disk1'/>
  </disk>
  <disk type='file' device='cdrom'>
    <driver name='qemu' type='raw'/>
    <target dev='sda' bus='sata'/>
  </disk>
  <interface type='user'/>
</devices></domain>"""


def parent_disk(device: str, filename: str, fmt: str = "qcow2") -> ParentDisk:
    return ParentDisk(device, f"#block-{device}", filename, fmt, 1 << 30, False, (filename,))


def forked(device: str, image: str, fmt: str = "qcow2") -> ForkedDisk:
    return ForkedDisk(parent_disk(device, image, fmt), Path(f"{image}.kvmsnap-1-2.qcow2"),
                      f"kvmsnap-1-2-{device}")


def test_the_disks_of_a_live_domain_with_their_chain_and_aliases():
    assert domain_disks(LIVE) == [
        DomainDisk("vda", "virtio-disk0", "/img/web.qcow2.kvmsnap-1-2.qcow2", "file", "qcow2",
                   False, "/img/web.qcow2"),
        DomainDisk("vdb", "virtio-disk1", "/dev/vg/data", "block", "raw", True, None),
        DomainDisk("sda", None, None, "file", "raw", True, None),  # an empty CD drive
    ]
    assert disk_by_target(LIVE, "vdb").source == "/dev/vg/data"
    assert disk_by_target(LIVE, "vdz") is None


def test_qemus_disks_are_named_as_libvirt_names_them():
    disks = (parent_disk("virtio-disk0", "/img/web.qcow2"), parent_disk("scsi0-0-0", "/x"))
    assert [d.device for d in named_by_target(disks, LIVE)] == ["vda", "scsi0-0-0"]


def test_the_snapshot_puts_our_overlays_on_top_and_names_every_other_disk():
    xml = snapshot_xml([forked("vda", "/img/web.qcow2")], domain_disks(LIVE), "kvmsnap-run-x")
    root = ET.fromstring(xml)
    assert root.findtext("name") == "kvmsnap-run-x"
    disks = {d.get("name"): d for d in root.findall("disks/disk")}
    assert list(disks) == ["vda", "vdb", "sda"]
    assert disks["vda"].get("snapshot") == "external" and disks["vda"].get("type") == "file"
    assert disks["vda"].find("source").get("file") == "/img/web.qcow2.kvmsnap-1-2.qcow2"
    assert disks["vda"].find("driver").get("type") == "qcow2"
    assert [disks[n].get("snapshot") for n in ("vdb", "sda")] == ["no", "no"]
    assert disks["vdb"].find("source") is None


def test_a_definition_naming_our_overlay_is_pointed_back_at_the_image():
    xml, changed = pointed_back(LIVE, [forked("vda", "/img/web.qcow2", fmt="raw")])
    assert changed == ["vda"]
    vda = disk_by_target(xml, "vda")
    assert (vda.source, vda.backing, vda.format) == ("/img/web.qcow2", None, "raw")
    assert disk_by_target(xml, "vdb") == disk_by_target(LIVE, "vdb")  # left alone


def test_a_definition_without_our_overlays_is_left_as_it_is():
    xml, changed = pointed_back(LIVE, [forked("vda", "/img/other.qcow2")])
    assert changed == [] and domain_disks(xml) == domain_disks(LIVE)
