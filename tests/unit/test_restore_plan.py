"""Restore's refusals and a libvirt domain's definition rewritten for its restored copy
(pure parts; tests/integration/test_restore_targets.py runs them against real VMs)."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmsnap_plugin.backends.libvirt_xml import RestoredDomain, restored_xml
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model import RecordedDisk, VmRecord
from kvmsnap_plugin.run.restore import RestoreOptions, _chosen, _format, _own_image
from kvmsnap_plugin.run.restore_guard import checked_target, refuse_images_in_use
from kvmsnap_plugin.run.restore_libvirt import plan_domain
from kvmsnap_plugin.run.restore_stream import write_image

DOMAIN = """<domain type='kvm'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/web'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/web-data.qcow2'/><target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
      <target dev='vnet3'/><model type='virtio'/></interface>
    <serial type='file'><source path='/var/log/web-console.log'/><target port='0'/></serial>
  </devices></domain>"""


def restored(**changes) -> tuple[ET.Element, list[str]]:
    plan = dict(name="web-restored", uuid="99999999-8888-7777-6666-555555555555",
                disks={"vda": ("/restore/vda.qcow2", "qcow2")},
                nvram="/restore/nvram.raw", plug_nics=False, log_dir="/restore")
    xml, dropped = restored_xml(DOMAIN, RestoredDomain(**{**plan, **changes}))
    return ET.fromstring(xml), dropped


def test_the_copy_gets_its_name_uuid_disks_nvram_and_consoles():
    root, dropped = restored()
    assert root.findtext("name") == "web-restored"
    assert root.findtext("uuid") == "99999999-8888-7777-6666-555555555555"
    vda = root.find("./devices/disk/target[@dev='vda']/..")
    assert vda.get("type") == "file" and vda.find("source").attrib == {
        "file": "/restore/vda.qcow2"}
    assert vda.find("driver").get("type") == "qcow2"
    assert root.findtext("./os/nvram") == "/restore/nvram.raw"
    assert root.find("./devices/serial/source").get("path") == "/restore/console0.log"
    # vdb was not restored: pointing the copy at the original's image would share it
    assert dropped == ["vdb"] and root.find("./devices/disk/target[@dev='vdb']") is None
    assert root.find("./devices/disk/target[@dev='sda']") is not None  # a CD stays


def test_the_copy_is_off_the_network_with_new_macs_unless_told():
    root, _ = restored()
    nic = root.find("./devices/interface")
    assert nic.find("mac") is None and nic.find("target") is None  # libvirt makes new ones
    assert nic.find("link").get("state") == "down"
    root, _ = restored(plug_nics=True)
    assert root.find("./devices/interface/link") is None


def test_a_non_empty_target_is_refused_without_force(tmp_path):
    (tmp_path / "vda.qcow2").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"is not empty \(vda\.qcow2\)"):
        checked_target(tmp_path, force=False)
    assert checked_target(tmp_path, force=True) == tmp_path.resolve()


def test_an_image_a_running_process_holds_is_refused_even_with_force(tmp_path):
    image = tmp_path / "vda.qcow2"
    image.write_bytes(b"x")
    with open(image, "rb") as held:
        holder = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        with pytest.raises(UsageError) as refused:
            refuse_images_in_use([image, tmp_path / "missing.qcow2"])
        assert str(refused.value).startswith(
            f"{image} is in use by running process {holder.pid} (sleep)")
    finally:
        holder.kill()
        holder.wait()
    refuse_images_in_use([image])


RECORD = VmRecord("web", "1", "t", "clean", "x", [], [
    RecordedDisk("vda", "/img/web.img", "raw", 1 << 30),
    RecordedDisk("vdb", "/img/data.qcow2", "qcow2", 1 << 30),
    RecordedDisk("nvram", "/var/lib/VARS.fd", "raw", 540672, flash=True)])


def test_disk_filter_and_formats():
    assert [d.device for d in _chosen(RECORD, ("vdb",))] == ["vdb"]
    assert len(_chosen(RECORD, ())) == 3
    with pytest.raises(UsageError, match="has no disk vdz") as refused:
        _chosen(RECORD, ("vdz",))
    assert refused.value.hint == "its disks: vda, vdb, nvram"
    assert [_format(d, RestoreOptions()) for d in RECORD.disks] == ["raw", "qcow2", "raw"]
    assert [_format(d, RestoreOptions(format="qcow2")) for d in RECORD.disks] == [
        "qcow2", "qcow2", "raw"]


def test_define_needs_a_domain_xml_and_a_bare_qemu_record_has_none():
    with pytest.raises(UsageError, match="holds no libvirt domain XML"):
        plan_domain("web", "", None, True, "qemu:///system", False)
    assert plan_domain("web", "", None, False, "qemu:///system", False) is None
    plan = plan_domain("web", DOMAIN, None, False, "qemu:///system", False)
    assert plan.name == "web-restored" and plan.uri is None and len(plan.uuid) == 36


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_stream_becomes_a_sparse_image_of_its_data(tmp_path: Path, fmt: str):
    # 64 MiB of zeroes around 1 MiB of data, through a pipe: only the data is allocated
    script = "head -c 32M /dev/zero; head -c 1M /dev/urandom; head -c 31M /dev/zero"
    dest = write_image(["sh", "-c", script], tmp_path / f"disk.{fmt}", fmt, 64 << 20,
                       timeout=60)
    assert dest.stat().st_mode & 0o777 == 0o600
    assert dest.stat().st_blocks * 512 < 3 << 20
    info = subprocess.run(["qemu-img", "info", "--output=json", dest], capture_output=True,
                          text=True, check=True).stdout
    assert f'"format": "{fmt}"' in info and '"virtual-size": 67108864' in info


def test_in_place_needs_force_and_an_image_file(tmp_path):
    disk = RecordedDisk("vda", str(tmp_path / "web.qcow2"), "qcow2", 1 << 20)
    with pytest.raises(UsageError, match=r"--in-place overwrites \S+web\.qcow2"):
        _own_image(disk, RestoreOptions(in_place=True))
    assert _own_image(disk, RestoreOptions(in_place=True, force=True)) == Path(disk.image)
    with pytest.raises(UsageError, match="cannot be restored in place"):
        _own_image(RecordedDisk("vda", "/dev/null", "raw", 1), RestoreOptions(force=True))
    with pytest.raises(UsageError, match="for its own definition"):
        _own_image(disk, RestoreOptions(in_place=True, force=True, define=True))


def test_the_latest_restic_run_without_its_record_is_passed_over(caplog):
    from kvmsnap_plugin.run.restore import _latest_complete_run

    def snap(run: str, time: str, path: str) -> dict:
        return {"time": time, "tags": ["kvmsnap", "image", f"run:{run}"], "paths": [path]}

    found = [snap("a", "2026-01-01T01:00", "/vdisk0.raw"),
             snap("a", "2026-01-01T01:01", "/kvmsnap-vm.json"),
             snap("b", "2026-01-02T01:00", "/vdisk0.raw")]  # the repository went away here
    assert _latest_complete_run(found) == "a"
    assert "run b is incomplete" in caplog.text
    assert _latest_complete_run(found[2:]) == "b"  # none complete: the newest fails later
