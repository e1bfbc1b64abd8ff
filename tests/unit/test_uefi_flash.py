"""UEFI guests and vTPMs without QEMU: the VARS flash found in ``query-block`` and carried
into the VM record and the restore note; a vTPM refused with the reason and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmsnap_plugin.backends.libvirt_xml import nvram_disk
from kvmsnap_plugin.disks.expose import flash_file
from kvmsnap_plugin.errors import UsageError, VMError
from kvmsnap_plugin.model import RecordedDisk, VmRecord
from kvmsnap_plugin.run.restore import RestoredDisk, RestoreOptions, _finish, _format
from kvmsnap_plugin.run.restore_stream import write_image
from kvmsnap_plugin.vm.clone_options import ClonePolicy, refuse_unclonable
from kvmsnap_plugin.vm.parent import block_disks

QEMU = "qemu-system-x86_64"


def block(device: str, qdev: str, filename: str, ro: bool = False) -> dict:
    image = {"filename": filename, "format": "raw", "virtual-size": 540672}
    return {"device": device, "qdev": qdev,
            "inserted": {"node-name": f"#{device}", "ro": ro, "image": image,
                         "file": filename, "drv": "raw"}}


def test_the_firmware_flashes_are_marked_and_ordinary_disks_are_not():
    disks = block_disks([
        block("pflash0", "/machine/system.flash0", "/usr/share/OVMF/OVMF_CODE_4M.fd", True),
        block("pflash1", "/machine/system.flash1", "/vm/VARS.fd"),  # -drive if=pflash
        block("", "/machine/virt.flash1", "/vm/arm-VARS.fd"),  # -blockdev + pflash1=NODE
        block("", "/machine/peripheral/vdisk0/virtio-backend", "/vm/disk.raw"),
    ])
    assert [(d.device, d.flash) for d in disks] == [
        ("pflash0", True), ("pflash1", True), ("#", True), ("vdisk0", False)]


def test_the_vars_file_of_files_mode_is_uefi_vars_fd_unless_there_are_several():
    assert flash_file("pflash1", 1) == "uefi-vars.fd"
    assert flash_file("pflash0", 2) == "uefi-pflash0.fd"


def test_the_record_marks_the_vars_disk_and_old_records_still_read():
    record = VmRecord("web", "1-2", "2026-01-01T00:00:00+00:00", "clean", "x", [QEMU],
                      [RecordedDisk("pflash1", "/vm/VARS.fd", "raw", 540672, flash=True)])
    assert VmRecord.from_json(record.to_json()).disks[0].flash
    data = json.loads(record.to_json())
    del data["disks"][0]["flash"]  # written before kvmsnap knew flashes
    assert not VmRecord.from_json(json.dumps(data)).disks[0].flash


def test_a_restored_vars_store_stays_raw_and_the_note_says_what_it_is(tmp_path: Path):
    raw = tmp_path / "pflash1.raw"
    raw.write_bytes(b"_FVH" * 1024)
    argv = [QEMU, "-drive", "if=pflash,unit=1,format=raw,file=/vm/VARS.fd"]
    disk = RecordedDisk("pflash1", "/vm/VARS.fd", "raw", 4096, flash=True)
    target = tmp_path / "to"
    target.mkdir()
    assert _format(disk, RestoreOptions(format="qcow2")) == "raw"  # whatever the others are
    dest = write_image(raw, target / "pflash1.raw", "raw", disk.virtual_size, timeout=60)
    restored = RestoredDisk(disk.device, str(dest), disk.image, "raw", disk.flash)
    assert Path(restored.path).read_bytes() == b"_FVH" * 1024
    done = _finish(VmRecord("web", "1", "t", "clean", "x", argv, [disk]), [restored], target,
                   None, RestoreOptions())
    assert done.argv[-1] == f"if=pflash,unit=1,format=raw,file={restored.path}"
    assert "the UEFI variable store (pflash)" in Path(done.note).read_text()


@pytest.mark.parametrize("tpmdev", [
    "emulator,id=tpm0,chardev=chrtpm",
    '{"id":"tpm-tpm0","type":"emulator","chardev":"chrtpm"}',  # libvirt's JSON
])
def test_a_vtpm_is_refused_naming_swtpm_and_the_fix(tpmdev):
    argv = [QEMU, "-chardev", "socket,id=chrtpm,path=/run/libvirt/qemu/swtpm/1-vm-swtpm.sock",
            "-tpmdev", tpmdev, "-device", "tpm-crb,tpmdev=tpm0,id=tpm0"]
    with pytest.raises(VMError) as info:
        refuse_unclonable(argv)
    line = info.value.one_line()
    assert "vTPM" in line and "swtpm process" in line
    assert "(fix: back this VM up offline, with swtpm's state directory" in line
    assert "--clone-drop" not in line  # dropping the TPM from the clone cannot work
    with pytest.raises(UsageError, match="keeps or refuses this itself"):
        ClonePolicy(frozenset({"tpmdev"}))


def test_a_libvirt_domain_names_its_nvram_from_its_xml():
    xml = """<domain><os><type>hvm</type>
      <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
      <nvram format='raw'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os></domain>"""
    disk = nvram_disk(xml)
    assert disk and (disk.target, disk.source, disk.format, disk.read_only) == (
        "nvram", "/var/lib/libvirt/qemu/nvram/web_VARS.fd", "raw", False)
    assert nvram_disk("<domain><os><type>hvm</type></os></domain>") is None
