"""kvmsnap-vm.json: what an archive says about its VM, written at backup, read at restore."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kvmsnap_plugin.host.secrets import redacted_argv
from kvmsnap_plugin.model import (
    ForkedDisk,
    ForkPoint,
    Label,
    Parent,
    ParentDisk,
    RamMethod,
    RecordedDisk,
    VmRecord,
)
from kvmsnap_plugin.run.metadata import REDACTED, record_of
from kvmsnap_plugin.run.restore import RestoredDisk, boot_argv

ROOT = ParentDisk("vda", "n0", "/images/web.qcow2", "qcow2", 8 << 30, False,
                  ("/images/web.qcow2",))
SEED = ParentDisk("vdb", "n1", "/images/seed.iso", "raw", 1 << 20, True, ("/images/seed.iso",))
PARENT = Parent(Path("/run/web.qmp"), 4242, "web",
                ("qemu-system-x86_64", "-m", "1024", "-drive", "file=/images/web.qcow2"),
                (8, 2, 0), (ROOT, SEED))


def point() -> ForkPoint:
    forked = ForkedDisk(ROOT, Path("/images/web.qcow2.kvmsnap-1-2.qcow2"), "kvmsnap-1-2-0")
    return ForkPoint(PARENT, (forked,), Path("/work/ram.state"), RamMethod.BACKGROUND,
                     12.5, 1.5, 3.0, 1 << 30, 9)


def test_the_record_of_a_fork_names_the_vm_its_writable_disks_and_command_line():
    before = datetime.now(UTC).replace(microsecond=0)
    record = record_of(point(), "1-2", Label.CLEAN, "web")
    assert record.vm == "web" and record.run == "1-2"
    assert record.label == "clean" and record.method == "background-snapshot"
    assert record.argv == list(PARENT.argv)
    assert record.disks == [RecordedDisk("vda", "/images/web.qcow2", "qcow2", 8 << 30)]
    taken = datetime.fromisoformat(record.taken_at)
    assert taken.tzinfo is not None and before <= taken <= before + timedelta(seconds=5)


def test_a_record_reads_back_from_its_json():
    record = record_of(point(), "1-2", Label.CRASH_CONSISTENT, "web")
    text = record.to_json()
    data = json.loads(text)
    assert data["label"] == "crash-consistent" and data["version"] == 1
    assert data["disks"][0] == {"device": "vda", "image": "/images/web.qcow2",
                                "format": "qcow2", "virtual_size": 8 << 30,
                                "flash": False}
    again = VmRecord.from_json(text)
    assert again == record
    assert isinstance(again.disks[0], RecordedDisk)
    assert VmRecord.from_json(text.decode()) == record  # str or bytes


# -- no secret of the VM's command line in the archived record -----------------------------------
SECRET_ARGV = (
    "qemu-system-x86_64", "-m", "1024",
    "-object", "secret,id=sec0,data=CANARY-DATA,format=raw",
    "-object", '{"qom-type":"secret","id":"libvirt-2-storage-auth-secret0",'
               '"data":"CANARY-JSON","keyid":"masterKey0","iv":"CANARY-IV","format":"base64"}',
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
               '"file":"/var/lib/libvirt/qemu/domain-1-web/master-key.aes"}',
    "-drive", "file=/images/web.qcow2,format=qcow2,if=virtio",
    "-drive", "file=rbd:pool/web:id=admin:key=CANARY-RBD==:conf=/etc/ceph/ceph.conf,format=raw",
    "-drive", "file.driver=iscsi,file.portal=10.0.0.1,file.user=bob,file.password=CANARY-ISCSI",
    "-drive", "file.driver=http,file.url=http://host/seed.iso,file.password-secret=sec0",
    "-cdrom", "https://alice:CANARY-URL@mirror.example/boot.iso",
    "-blockdev", '{"driver":"rbd","pool":"p","image":"i","user":"admin",'
                 '"key-secret":"sec0","node-name":"rbd0","password":"CANARY-JSON-PW"}',
    "-spice", "port=5930,password=CANARY-SPICE",
    "-vnc", ":1,password=on",
    "-iscsi", "initiator-name=iqn.2024-01.kvmsnap:web,user=bob,password=CANARY-ISCSI2",
)


def secret_point() -> ForkPoint:
    parent = Parent(PARENT.qmp_socket, PARENT.pid, "web", SECRET_ARGV, (7, 2, 0), (ROOT,))
    forked = ForkedDisk(ROOT, Path("/images/web.qcow2.kvmsnap-1-2.qcow2"), "kvmsnap-1-2-0")
    return ForkPoint(parent, (forked,), Path("/work/ram.state"), RamMethod.BACKGROUND,
                     12.5, 1.5, 3.0, 1 << 30, 9)


def test_the_record_holds_no_secret_of_the_command_line():
    text = record_of(secret_point(), "1-2", Label.CLEAN, "web").to_json()
    assert b"CANARY" not in text
    assert text.count(REDACTED.encode()) == 9


def test_the_record_keeps_what_a_restore_needs_and_the_ids_of_secret_objects():
    argv = record_of(secret_point(), "1-2", Label.CLEAN, "web").argv
    assert len(argv) == len(SECRET_ARGV)
    changed = {i for i, (a, b) in enumerate(zip(argv, SECRET_ARGV, strict=True)) if a != b}
    assert changed == {4, 6, 12, 14, 18, 20, 22, 26}
    assert argv[4] == "secret,id=sec0,data=<redacted>,format=raw"
    assert json.loads(argv[6]) == {"qom-type": "secret", "id": "libvirt-2-storage-auth-secret0",
                                   "data": REDACTED, "keyid": "masterKey0", "iv": REDACTED,
                                   "format": "base64"}
    assert argv[12] == ("file=rbd:pool/web:id=admin:key=<redacted>:conf=/etc/ceph/ceph.conf,"
                        "format=raw")
    assert argv[14].endswith("file.user=bob,file.password=<redacted>")
    assert argv[18] == "https://alice:<redacted>@mirror.example/boot.iso"
    assert json.loads(argv[20])["key-secret"] == "sec0"  # an id: kept
    assert argv[22] == "port=5930,password=<redacted>"
    # untouched: the disks, a secret object read from a file, a password-secret id, VNC's
    # password=on (a switch, no secret)
    assert argv[8] == SECRET_ARGV[8] and argv[10] == SECRET_ARGV[10]
    assert argv[16] == SECRET_ARGV[16] and argv[24] == ":1,password=on"


def test_a_restore_boots_the_restored_disks_from_a_redacted_record(tmp_path):
    record = VmRecord.from_json(record_of(secret_point(), "1-2", Label.CLEAN, "web").to_json())
    restored = RestoredDisk("vda", str(tmp_path / "vda.qcow2"), "/images/web.qcow2", "qcow2")
    argv = boot_argv(record, [restored])
    assert f"file={tmp_path}/vda.qcow2,format=qcow2,if=virtio" in argv
    assert "secret,id=sec0,data=<redacted>,format=raw" in argv
    assert not any("CANARY" in arg for arg in argv)


def test_a_command_line_without_secrets_is_recorded_byte_for_byte():
    plain = ("qemu-system-x86_64", "-name", "guest=web,debug-threads=on",
             "-drive", "file=/img/a,,key=b.img,format=raw",  # a file named "a,key=b.img"
             "-blockdev", '{"driver": "file", "filename": "/img/key.raw"}',
             "-object", "secret,id=s0,file=/root/pw,format=raw",
             "-append", "console=ttyS0,115200 root=/dev/vda")
    assert redacted_argv(plain, REDACTED) == list(plain)
