"""The clone's command line: same machine, nothing of the parent's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmsnap_plugin.clone import CloneDisk, rewrite_argv
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.parent import ParentDisk, refuse_unclonable
from kvmsnap_plugin.qemu_args import KeyVal, parse_argv


def disk(path: Path, device="vdisk0", fmt="qcow2") -> ParentDisk:
    path.touch()
    return ParentDisk(device, "node0", str(path), fmt, 1 << 20, False, (str(path),))


def clone_of(d: ParentDisk, tmp: Path) -> CloneDisk:
    return CloneDisk(d.device, tmp / f"clone-{d.device}.qcow2", Path(d.filename), d.format)


def rewrite(argv, disks, tmp, console=None):
    clones = [clone_of(d, tmp) for d in disks]
    out = rewrite_argv(argv, disks, clones, tmp / "clone.sock", console)
    return out, clones


def options(argv):
    return [(o.name, o.value) for o in parse_argv(argv)[1]]


def test_parent_only_options_are_dropped_and_clone_options_added(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu-system-x86_64", "-daemonize", "-pidfile", "/run/vm.pid", "-qmp",
            "unix:/run/vm.qmp,server=on,wait=off", "-monitor", "stdio", "-vnc", ":1",
            "-D", "/var/log/vm.log", "-no-shutdown", "-nographic",
            "-drive", f"file={d.filename},format=qcow2,if=virtio", "-m", "512"]
    out, _ = rewrite(argv, [d], tmp_path)
    names = [n for n, _ in options(out)]
    for gone in ("daemonize", "pidfile", "monitor", "vnc", "D", "no-shutdown", "nographic"):
        assert gone not in names
    assert ("qmp", f"unix:{tmp_path}/clone.sock,server=on,wait=off") in options(out)
    assert ("incoming", "defer") in options(out) and ("S", None) in options(out)
    assert ("display", "none") in options(out) and ("m", "512") in options(out)
    assert "/run/vm.qmp" not in " ".join(out)


def test_drive_and_hda_disks_point_at_the_clone_overlays(tmp_path):
    a, b = disk(tmp_path / "a.img", "a", "raw"), disk(tmp_path / "b.qcow2", "b")
    argv = ["qemu", "-drive", f"file={a.filename},format=raw,if=none,id=a,snapshot=off",
            "-hda", b.filename, "-cdrom", "/srv/install.iso"]
    out, clones = rewrite(argv, [a, b], tmp_path)
    drive = KeyVal.parse(dict(options(out))["drive"])
    assert drive.get("file") == str(clones[0].overlay) and drive.get("format") == "qcow2"
    assert dict(options(out))["hda"] == str(clones[1].overlay)
    assert dict(options(out))["cdrom"] == "/srv/install.iso"  # read-only: shared as is


def test_blockdev_file_and_format_nodes_are_rewritten(tmp_path):
    a, b = disk(tmp_path / "a.img", "a", "raw"), disk(tmp_path / "b.qcow2", "b")
    argv = ["qemu",
            "-blockdev", f"driver=file,filename={a.filename},node-name=a-file",
            "-blockdev", "driver=raw,file=a-file,node-name=a-fmt",
            "-blockdev", json.dumps({"driver": "file", "filename": b.filename,
                                     "node-name": "b-file"}),
            "-blockdev", json.dumps({"driver": "qcow2", "file": "b-file", "node-name": "b-fmt",
                                     "backing": None})]
    out, clones = rewrite(argv, [a, b], tmp_path)
    specs = [json.loads(v) for n, v in options(out) if n == "blockdev"]
    assert specs[0]["filename"] == str(clones[0].overlay)
    assert specs[1] == {"driver": "qcow2", "file": "a-file", "node-name": "a-fmt"}
    assert specs[2]["filename"] == str(clones[1].overlay)
    assert "backing" not in specs[3] and specs[3]["driver"] == "qcow2"


def test_a_disk_missing_from_the_command_line_is_refused(tmp_path):
    a = disk(tmp_path / "a.qcow2")
    with pytest.raises(VMError, match="not on the VM's command line"):
        rewrite(["qemu", "-m", "256"], [a], tmp_path)


def test_network_backends_are_isolated(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename,
            "-netdev", "tap,id=n0,ifname=tap0,script=no,vhost=on",
            "-netdev", "user,id=n1,hostfwd=tcp::2222-:22,smb=/srv",
            "-nic", "bridge,br=br0,model=e1000,mac=52:54:00:00:00:01",
            "-device", "virtio-net-pci,netdev=n0"]
    out, _ = rewrite(argv, [d], tmp_path)
    netdevs = [v for n, v in options(out) if n == "netdev"]
    assert netdevs == ["user,id=n0,restrict=on", "user,id=n1,restrict=on"]
    assert dict(options(out))["nic"] == "user,model=e1000,mac=52:54:00:00:00:01,restrict=on"
    assert "tap0" not in " ".join(out) and "2222" not in " ".join(out)


def test_chardevs_and_serial_ports_are_bit_bucketed(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename,
            "-chardev", "socket,id=ser0,path=/run/vm-serial.sock,server=on,wait=off",
            "-serial", "chardev:ser0", "-serial", "pty", "-parallel", "file:/tmp/lp",
            "-chardev", "socket,id=mon,path=/run/vm.mon,server=on", "-mon", "chardev=mon",
            "-audiodev", "pa,id=snd0,server=/run/pulse"]
    out, _ = rewrite(argv, [d], tmp_path)
    opts = options(out)
    assert [v for n, v in opts if n == "chardev"] == ["null,id=ser0", "null,id=mon"]
    assert [v for n, v in opts if n == "serial"] == ["chardev:ser0", "null"]
    assert ("parallel", "null") in opts and ("audiodev", "none,id=snd0") in opts
    assert "mon" not in [n for n, _ in opts]


def test_the_clone_console_can_be_captured_for_debugging(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename, "-chardev", "file,id=c0,path=/var/log/vm.log",
            "-serial", "chardev:c0"]
    out, _ = rewrite(argv, [d], tmp_path, console=tmp_path / "clone.log")
    assert ("chardev", f"file,id=c0,path={tmp_path}/clone.log") in options(out)


@pytest.mark.parametrize("args, what", [
    (["-device", "vfio-pci,host=01:00.0"], "VFIO"),
    (["-device", "vhost-user-blk-pci,chardev=c"], "vhost-user"),
    (["-netdev", "vhost-user,id=n,chardev=c"], "vhost-user"),
    (["-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x,share=on"], "shared"),
    (["-virtfs", "local,path=/srv,mount_tag=srv,security_model=none"], "9p"),
    (["-snapshot"], "temporary disks"),
    (["-device", "vhost-vsock-pci,guest-cid=3"], "vhost"),
])
def test_unclonable_parents_are_refused(args, what):
    with pytest.raises(VMError, match=what):
        refuse_unclonable(["qemu-system-x86_64", "-m", "256", *args])


def test_keyval_round_trips_escaped_commas():
    opts = KeyVal.parse("file=/a,,b.img,format=raw")
    assert opts.get("file") == "/a,b.img"
    assert opts.render() == "file=/a,,b.img,format=raw"
