"""The clone's command line: same machine, nothing of the parent's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import CloneDisk, ParentDisk
from kvmsnap_plugin.vm.clone_argv import agent_chardev_ids, rewrite_argv
from kvmsnap_plugin.vm.clone_options import ClonePolicy, refuse_unclonable
from kvmsnap_plugin.vm.clone_secrets import copy_master_key
from kvmsnap_plugin.vm.qemu_args import KeyVal, parse_argv, parse_blockdev


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
    values = [v for n, v in options(out) if n == "blockdev"]
    specs = [parse_blockdev(v) for v in values]
    # each keeps its syntax: key=value for QEMU to type, JSON as it was
    assert [v.startswith("{") for v in values] == [False, False, True, True]
    assert specs[0]["filename"] == str(clones[0].overlay)
    assert specs[1] == {"driver": "qcow2", "file": "a-file", "node-name": "a-fmt"}
    assert specs[2]["filename"] == str(clones[1].overlay)
    assert "backing" not in specs[3] and specs[3]["driver"] == "qcow2"


def test_dotted_blockdev_options_stay_key_value_for_qemu_to_type(tmp_path):
    # JSON would hand QEMU the string "on" where its schema wants a boolean, and the clone
    # would not start ("Invalid parameter type for 'cache.direct', expected: boolean").
    a = disk(tmp_path / "a.img", "a", "raw")
    argv = ["qemu", "-blockdev", f"driver=file,filename={a.filename},node-name=a-file,"
                                 "cache.direct=on,aio=native",
            "-blockdev", "driver=raw,file=a-file,node-name=a-fmt,cache.no-flush=off"]
    out, clones = rewrite(argv, [a], tmp_path)
    values = [v for n, v in options(out) if n == "blockdev"]
    assert values[0] == (f"driver=file,filename={clones[0].overlay},node-name=a-file,"
                         "cache.direct=on,aio=native")
    assert values[1] == "driver=qcow2,file=a-file,node-name=a-fmt,cache.no-flush=off"


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


# -- libvirt ---------------------------------------------------------------------------------------
def libvirt_argv(image: Path, domain_dir: Path) -> list[str]:
    """A libvirt 9.0 / QEMU 7.2 command line as /proc/PID/cmdline had it (test domain
    ``kvmsnap-exp``: TCG, direct kernel boot, one qcow2 disk, file serial, user NIC),
    trimmed of the kernel arguments."""
    return [
        "/usr/bin/qemu-system-x86_64", "-name", "guest=kvmsnap-exp,debug-threads=on", "-S",
        "-object", json.dumps({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                               "file": f"{domain_dir}/master-key.aes"}),
        "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram",
        "-accel", "tcg", "-cpu", "qemu64", "-m", "256",
        "-object", '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "25246d01-e5b0-4c22-a6a3-2a0b33c64519", "-display", "none",
        "-no-user-config", "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=29,server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
        "-kernel", "/var/lib/kvmsnap/vmlinuz", "-initrd", "/var/lib/kvmsnap/initrd.gz",
        "-append", "console=ttyS0 quiet panic=-1",
        "-device", '{"driver":"piix3-usb-uhci","id":"usb","bus":"pci.0","addr":"0x1.0x2"}',
        "-blockdev", json.dumps({"driver": "file", "filename": str(image),
                                 "node-name": "libvirt-1-storage", "auto-read-only": True,
                                 "discard": "unmap"}),
        "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2",'
                     '"file":"libvirt-1-storage","backing":null}',
        "-device", '{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x3",'
                   '"drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}',
        "-netdev", '{"type":"user","id":"hostnet0"}',
        "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0",'
                   '"mac":"52:54:00:1c:0a:49","bus":"pci.0","addr":"0x2"}',
        "-add-fd", "set=0,fd=30,opaque=serial0-source",
        "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on",
        "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
        "-audiodev", '{"id":"audio1","driver":"none"}',
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on",
    ]


def test_a_libvirt_command_line_becomes_a_clone_of_our_own(tmp_path):
    d = ParentDisk("vda", "libvirt-1-format", str(tmp_path / "data0.qcow2"), "qcow2", 1 << 26,
                   False, ())
    Path(d.filename).touch()
    argv = libvirt_argv(Path(d.filename), Path("/var/lib/libvirt/qemu/domain-1-kvmsnap-exp"))
    refuse_unclonable(argv)  # the fd set only feeds a chardev: that is fine
    clone = clone_of(d, tmp_path)
    out = rewrite_argv(argv, [d], [clone], tmp_path / "clone.sock", None, workdir=tmp_path)
    opts = options(out)
    names = [n for n, _ in opts]
    for gone in ("mon", "add-fd", "sandbox", "no-shutdown"):
        assert gone not in names
    assert names.count("S") == 1 and ("incoming", "defer") in opts
    # The monitor fd and the fd-set serial log are the parent's: plain null chardevs now.
    assert [v for n, v in opts if n == "chardev"] == ["null,id=charmonitor",
                                                      "null,id=charserial0"]
    assert "/dev/fdset" not in " ".join(out) and "fd=29" not in " ".join(out)
    secret = json.loads(next(v for n, v in opts if n == "object" and "masterKey0" in v))
    assert secret["file"] == str(tmp_path / "master-key.aes")
    specs = [json.loads(v) for n, v in opts if n == "blockdev"]
    assert specs[0]["filename"] == str(clone.overlay)
    assert specs[1] == {"node-name": "libvirt-1-format", "read-only": False,
                        "driver": "qcow2", "file": "libvirt-1-storage"}  # backing from header
    assert json.loads(dict(opts)["netdev"]) == {"type": "user", "id": "hostnet0",
                                                "restrict": True}
    assert ("audiodev", "none,id=audio1") in opts
    assert ("uuid", "25246d01-e5b0-4c22-a6a3-2a0b33c64519") in opts  # same machine


def test_a_libvirt_serial_log_can_be_captured_for_debugging(tmp_path):
    d = disk(tmp_path / "data0.qcow2")
    out = rewrite_argv(libvirt_argv(Path(d.filename), tmp_path), [d], [clone_of(d, tmp_path)],
                       tmp_path / "clone.sock", tmp_path / "clone.log", workdir=tmp_path)
    assert ("chardev", f"file,id=charserial0,path={tmp_path}/clone.log") in options(out)


def test_libvirt_json_network_backends_are_isolated(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename,
            "-netdev", '{"type":"tap","fd":"33","vhost":true,"vhostfd":"35","id":"hostnet0"}',
            "-netdev", '{"type":"user","id":"hostnet1","hostfwd":[{"str":"tcp::2222-:22"}]}']
    out, _ = rewrite(argv, [d], tmp_path)
    assert [json.loads(v) for n, v in options(out) if n == "netdev"] == [
        {"type": "user", "id": "hostnet0", "restrict": True},
        {"type": "user", "id": "hostnet1", "restrict": True}]


def test_a_disk_passed_as_an_fd_set_is_refused():
    argv = ["qemu-system-x86_64", "-add-fd", "set=3,fd=40,opaque=libvirt-1-storage",
            "-blockdev", '{"driver":"file","filename":"/dev/fdset/3","node-name":"s"}']
    with pytest.raises(VMError, match="passed as a descriptor"):
        refuse_unclonable(argv)


@pytest.mark.parametrize("args, what", [
    (["-device", '{"driver":"vfio-pci","host":"0000:01:00.0","id":"hostdev0"}'], "VFIO"),
    (["-object", '{"qom-type":"memory-backend-file","id":"m","size":1073741824,'
                 '"mem-path":"/dev/shm/x","share":true}'], "shared"),
    (["-netdev", '{"type":"vhost-user","id":"n","chardev":"c"}'], "vhost-user"),
    (["-tpmdev", "emulator,id=tpm-tpm0,chardev=chrtpm"], "TPM emulator"),
])
def test_unclonable_libvirt_json_options_are_refused(args, what):
    with pytest.raises(VMError, match=what):
        refuse_unclonable(["qemu-system-x86_64", *args])


def test_the_master_key_is_copied_privately_for_the_clone(tmp_path):
    domain_dir = tmp_path / "domain-1-vm"
    domain_dir.mkdir()
    (domain_dir / "master-key.aes").write_bytes(b"k" * 32)
    workdir = tmp_path / "work"
    workdir.mkdir()
    copied = copy_master_key(libvirt_argv(tmp_path / "d.qcow2", domain_dir), workdir)
    assert copied == workdir / "master-key.aes" and copied.read_bytes() == b"k" * 32
    assert copied.stat().st_mode & 0o777 == 0o600
    assert copy_master_key(["qemu-system-x86_64", "-m", "256"], workdir) is None


def test_the_guest_agent_channel_becomes_the_clones_own_socket(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename, "-device", "virtio-serial-pci,id=vser0",
            "-chardev", "socket,id=qga0,path=/run/vm-qga.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    clones = [clone_of(d, tmp_path)]
    out = rewrite_argv(argv, [d], clones, tmp_path / "clone.sock", None,
                       agent_socket=tmp_path / "qga.sock")
    assert ("chardev", f"socket,id=qga0,path={tmp_path}/qga.sock,server=on,wait=off") in \
        options(out)
    assert "/run/vm-qga.sock" not in " ".join(out)


def test_a_libvirt_guest_agent_channel_becomes_the_clones_own_socket(tmp_path):
    d = disk(tmp_path / "data0.qcow2")
    argv = [*libvirt_argv(Path(d.filename), tmp_path),
            "-device", '{"driver":"virtio-serial-pci","id":"virtio-serial0","bus":"pci.0",'
                       '"addr":"0x4"}',
            "-chardev", "socket,id=charchannel0,fd=33,server=on,wait=off",
            "-device", '{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,'
                       '"chardev":"charchannel0","id":"channel0",'
                       '"name":"org.qemu.guest_agent.0"}']
    assert agent_chardev_ids(argv) == {"charchannel0"}
    agent = tmp_path / "clone-qga.sock"
    out = rewrite_argv(argv, [d], [clone_of(d, tmp_path)], tmp_path / "clone.sock", None,
                       workdir=tmp_path, agent_socket=agent)
    assert ("chardev", f"socket,id=charchannel0,path={agent},server=on,wait=off") in \
        options(out)
    assert "fd=33" not in " ".join(out)


# -- the allow-list at work ------------------------------------------------------------------------
def test_nothing_of_the_parents_hostile_options_reaches_the_clone(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename,
            "-debugcon", "unix:/run/vm-debug.sock,server=on,wait=off",
            "-gdb", "unix:/run/vm-gdb.sock,server=on,wait=off", "-s",
            "-virtioconsole", "file:/var/log/vm-console.log",
            "-trace", "events=/etc/vm-events,file=/var/log/vm-trace",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            "-object", "filter-dump,id=fd0,netdev=n0,file=/var/log/vm-dump.pcap",
            "-audio", "alsa,model=hda,out.dev=hw:0", "-action", "shutdown=pause,panic=none",
            "-chardev", "stdio,id=c0,mux=on", "-serial", "chardev:c0"]
    out, _ = rewrite(argv, [d], tmp_path)
    opts = options(out)
    assert ("debugcon", "null") in opts and ("virtioconsole", "null") in opts
    assert ("audio", "none,model=hda") in opts and ("action", "panic=none") in opts
    assert ("chardev", "null,id=c0,mux=on") in opts  # shared by several frontends
    names = [n for n, _ in opts]
    for gone in ("gdb", "s", "trace"):
        assert gone not in names
    assert not any(n == "object" and "filter-dump" in v for n, v in opts)
    assert "/run/vm-" not in " ".join(out) and "/var/log/vm-" not in " ".join(out)
    assert "alsa" not in " ".join(out) and "shutdown=pause" not in " ".join(out)


def test_an_action_of_shutdown_alone_goes(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    out, _ = rewrite(["qemu", "-hda", d.filename, "-action", "shutdown=pause"], [d], tmp_path)
    assert "action" not in [n for n, _ in options(out)]


def test_writable_disk_shortcuts_point_at_the_clone_overlays(tmp_path):
    names = ("pflash", "fda", "sd", "mtdblock")
    disks = [disk(tmp_path / f"{name}.img", name, "raw") for name in names]
    code = tmp_path / "OVMF_CODE.fd"  # read-only firmware: not a disk to back up
    argv = ["qemu", "-pflash", str(code)]
    for name, d in zip(names, disks, strict=True):
        argv += [f"-{name}", d.filename]
    out, clones = rewrite(argv, disks, tmp_path)
    opts = options(out)
    assert ("pflash", str(code)) in opts
    for name, clone in zip(names, clones, strict=True):
        assert (name, str(clone.overlay)) in opts


def test_the_clone_is_refused_or_leaves_out_what_the_operator_drops(tmp_path):
    d = disk(tmp_path / "a.qcow2")
    argv = ["qemu", "-hda", d.filename, "-set", "netdev.n0.restrict=off",
            "-object", "input-linux,id=kbd,evdev=/dev/input/event0"]
    with pytest.raises(VMError, match="-set, whose effect") as info:
        rewrite(argv, [d], tmp_path)
    assert "--clone-drop set" in info.value.hint
    policy = ClonePolicy(drops=frozenset({"set", "object:input-linux"}))
    out = rewrite_argv(argv, [d], [clone_of(d, tmp_path)], tmp_path / "clone.sock", None,
                       policy=policy)
    assert "set" not in [n for n, _ in options(out)] and "input-linux" not in " ".join(out)


# -- secrets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "secret,id=sec0,data=CANARY-1,format=raw",
    '{"qom-type":"secret","id":"sec0","data":"CANARY-1","format":"raw"}',
])
def test_an_inline_secret_reaches_the_clone_through_a_private_file(tmp_path, value):
    from kvmsnap_plugin.vm.clone_secrets import secret_for_clone, write_clone_secrets

    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o700)
    rewritten = secret_for_clone(value, workdir)
    assert "CANARY-1" not in rewritten and str(workdir / "secret-sec0") in rewritten
    assert "sec0" in rewritten and "raw" in rewritten
    (workdir / "secret-sec0").symlink_to(tmp_path / "elsewhere")  # a planted link: replaced
    [written] = write_clone_secrets(["qemu-system-x86_64", "-object", value], workdir)
    assert written.read_bytes() == b"CANARY-1"
    assert written.stat().st_mode & 0o777 == 0o600 and not written.is_symlink()
    assert not (tmp_path / "elsewhere").exists()


def test_a_secret_read_from_a_file_is_left_as_it_is(tmp_path):
    from kvmsnap_plugin.vm.clone_secrets import secret_for_clone, write_clone_secrets

    value = "secret,id=s1,file=/etc/kvm/s1.key"
    assert secret_for_clone(value, tmp_path) == value
    assert write_clone_secrets(["qemu-system-x86_64", "-object", value], tmp_path) == []
