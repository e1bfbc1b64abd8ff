"""The parent VM as read from its command line and from QMP's ``query-block``."""

from __future__ import annotations

import json

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.vm.clone_options import refuse_unclonable
from kvmsnap_plugin.vm.parent import block_disks, check_disks, option_fields

QEMU = "qemu-system-x86_64"


# -- refuse_unclonable ---------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "value", "says"), [
    ("-device", "vfio-pci,host=0000:01:00.0", "VFIO passthrough"),
    ("-device", '{"driver":"vhost-user-fs-pci","chardev":"c0"}', "vhost-user device"),
    ("-device", "vhost-vsock-pci,guest-cid=3", "vhost device"),
    ("-device", "ivshmem-plain,memdev=m0", "ivshmem"),
    ("-device", "usb-host,hostbus=1,hostaddr=2", "passed-through host device"),
    ("-object", "memory-backend-memfd,id=m0,size=1G,share=on", "share=on"),
    ("-object", '{"qom-type":"memory-backend-file","id":"m0","share":true}', "share=on"),
    ("-netdev", "vhost-user,id=n0,chardev=c0", "vhost-user network backend"),
    ("-fsdev", "local,id=f0,path=/srv", "9p"),
    ("-virtfs", "local,path=/srv,mount_tag=t", "9p"),
    ("-tpmdev", "emulator,id=t0,chardev=c0", "TPM emulator"),
    ("-tpmdev", "passthrough,id=t0,path=/dev/tpm0", "host TPM"),
    ("-mem-path", "/dev/hugepages", "-mem-path"),
    ("-readconfig", "/etc/vm.cfg", "-readconfig"),
])
def test_devices_a_second_copy_cannot_have_are_refused(option, value, says):
    with pytest.raises(VMError, match="cannot be forked") as info:
        refuse_unclonable([QEMU, "-m", "1G", option, value])
    assert says in str(info.value)


def test_snapshot_mode_is_refused():
    with pytest.raises(VMError, match="-snapshot"):
        refuse_unclonable([QEMU, "-snapshot", "-hda", "/vm/a.img"])


@pytest.mark.parametrize("argv", [
    [QEMU, "-device", "virtio-blk-pci,drive=d0", "-netdev", "user,id=n0",
     "-object", "memory-backend-memfd,id=m0,size=1G,share=off"],
    # libvirt: a serial log through an fd set is fine, only chardevs use it
    [QEMU, "-add-fd", "set=0,fd=31", "-chardev", "file,id=c0,path=/dev/fdset/0"],
])
def test_ordinary_vms_pass(argv):
    refuse_unclonable(argv)


def test_a_disk_opened_through_an_fd_set_is_refused():
    argv = [QEMU, "-add-fd", "set=2,fd=40",
            "-blockdev", '{"driver":"file","filename":"/dev/fdset/2","node-name":"f0"}']
    with pytest.raises(VMError, match=r"/dev/fdset/2"):
        refuse_unclonable(argv)


# -- option_fields -------------------------------------------------------------------------------
def test_option_fields_from_key_value_syntax_with_the_implied_key():
    assert option_fields("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56", "driver") == {
        "driver": "virtio-net-pci", "netdev": "n0", "mac": "52:54:00:12:34:56"}


def test_option_fields_keep_doubled_commas_and_bare_flags():
    assert option_fields("file,id=c0,path=/a,,b,append", "backend") == {
        "backend": "file", "id": "c0", "path": "/a,b", "append": ""}


def test_option_fields_from_json_as_libvirt_writes_them():
    value = json.dumps({"driver": "virtserialport", "id": 3, "share": True, "ro": False,
                        "none": None, "nested": {"a": 1}, "list": [1]})
    assert option_fields(value, "driver") == {
        "driver": "virtserialport", "id": "3", "share": "on", "ro": "off", "none": ""}


def test_option_fields_of_broken_json_are_empty():
    assert option_fields('{"driver": ', "driver") == {}


# -- block_disks (query-block) -------------------------------------------------------------------
QUERY_BLOCK = [
    {   # a -device disk: the name comes from its qdev path
        "device": "", "qdev": "/machine/peripheral/vdisk0/virtio-backend",
        "inserted": {
            "node-name": "fmt0", "ro": False, "drv": "qcow2", "file": "/vm/top.qcow2",
            "image": {"filename": "/vm/top.qcow2", "format": "qcow2",
                      "virtual-size": 1073741824,
                      "backing-image": {"filename": "/vm/base.qcow2", "format": "qcow2"}},
        },
    },
    {   # an -drive without -device: its drive name
        "device": "ide0-hd1", "qdev": "/machine/unattached/device[23]",
        "inserted": {"node-name": "#block123", "ro": True, "drv": "raw",
                     "file": "/vm/iso.raw",
                     "image": {"filename": "/vm/iso.raw", "format": "raw",
                               "virtual-size": 4096}},
    },
    {"device": "ide1-cd0", "qdev": "/machine/unattached/device[24]"},  # empty CD drive
    {   # no drive name, no -device id: the node name
        "device": "", "qdev": "",
        "inserted": {"node-name": "node7", "ro": False, "drv": "raw", "file": "/vm/d.raw",
                     "image": {}},
    },
]


def test_block_disks_reads_query_block():
    top, iso, bare = block_disks(QUERY_BLOCK)
    assert (top.device, top.node, top.filename, top.format) == (
        "vdisk0", "fmt0", "/vm/top.qcow2", "qcow2")
    assert top.virtual_size == 1 << 30 and not top.read_only
    assert top.chain == ("/vm/top.qcow2", "/vm/base.qcow2")
    assert (iso.device, iso.read_only, iso.virtual_size) == ("ide0-hd1", True, 4096)
    assert iso.chain == ("/vm/iso.raw",)
    # without image details, the inserted node's own file and driver
    assert (bare.device, bare.filename, bare.format, bare.chain) == (
        "node7", "/vm/d.raw", "raw", ())


def test_block_disks_of_a_vm_without_disks():
    assert block_disks([]) == ()


# -- encrypted disks (query-block's format-specific data, the whole chain) -----------------------
def luks_block(device: str, image: dict, *, ro: bool = False, encrypted: bool = True) -> dict:
    return {"device": device, "qdev": "",
            "inserted": {"node-name": f"n-{device}", "ro": ro, "drv": image["format"],
                         "file": image["filename"], "encrypted": encrypted, "image": image}}


LUKS_QCOW2 = {"filename": "/vm/luks.qcow2", "format": "qcow2", "encrypted": True,
              "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "encrypt": {
                  "format": "luks", "cipher-alg": "aes-256", "slots": []}}}}
RAW_LUKS = {"filename": "/vm/raw.luks", "format": "luks", "encrypted": True,
            "format-specific": {"type": "luks", "data": {"cipher-alg": "aes-256"}}}
PLAIN = {"filename": "/vm/plain.qcow2", "format": "qcow2",
         "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}


def test_block_disks_tell_how_a_disk_is_encrypted():
    qcow2, raw, below, flagged, plain = block_disks([
        luks_block("d0", LUKS_QCOW2), luks_block("d1", RAW_LUKS),
        # QEMU says encrypted=false for a plain top image on an encrypted base
        luks_block("d2", {**PLAIN, "backing-image": LUKS_QCOW2}, encrypted=False),
        luks_block("d3", {"filename": "/vm/x.qcow2", "format": "qcow2"}),
        luks_block("d4", PLAIN, encrypted=False)])
    assert (qcow2.encryption, raw.encryption, below.encryption) == ("luks", "luks", "luks")
    assert (flagged.encryption, plain.encryption) == ("encrypted", "")
    assert [d.encryption for d in block_disks(QUERY_BLOCK)] == ["", "", ""]


def test_a_writable_encrypted_disk_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr("kvmsnap_plugin.vm.parent._is_local_file", lambda _: True)
    disks = block_disks([luks_block("vda", PLAIN, encrypted=False),
                         luks_block("vdb", LUKS_QCOW2)])
    with pytest.raises(VMError) as info:
        check_disks("web", disks)
    assert str(info.value) == ("disk vdb of web is encrypted (LUKS): kvmsnap's overlays would "
                               "hold the data written during the backup unencrypted")
    assert info.value.hint == "back it up offline (its images are encrypted as they are)"


def test_a_read_only_encrypted_disk_gets_no_overlay_and_passes(monkeypatch):
    monkeypatch.setattr("kvmsnap_plugin.vm.parent._is_local_file", lambda _: True)
    check_disks("web", block_disks([luks_block("vda", PLAIN, encrypted=False),
                                    luks_block("vdb", LUKS_QCOW2, ro=True)]))


@pytest.mark.parametrize("filename", ["vars.fd", "images/web.qcow2", "./web.qcow2"])
def test_a_disk_given_by_a_relative_path_is_refused_with_the_fix(filename):
    disks = block_disks([luks_block("pflash1", {"filename": filename, "format": "raw"},
                                    encrypted=False)])
    with pytest.raises(VMError, match=f"relative path \\({filename}\\)") as info:
        check_disks("web", disks)
    assert "absolute paths" in info.value.hint


@pytest.mark.parametrize("filename", ["rbd:pool/image", "nbd+unix:///x?socket=/s",
                                      'json:{"file": {"driver": "iscsi"}}'])
def test_a_network_disk_is_not_called_a_relative_path(filename):
    disks = block_disks([luks_block("vda", {"filename": filename, "format": "raw"},
                                    encrypted=False)])
    with pytest.raises(VMError, match="protocol"):
        check_disks("web", disks)
