"""The clone's allow-list: every option of the parent is kept, dropped or refused by rule."""

from __future__ import annotations

import json
import os

import pytest

from kvmsnap_plugin.errors import UsageError, VMError
from kvmsnap_plugin.model import ForkOptions, Parent, QemuOptions
from kvmsnap_plugin.vm import clone_argv, clone_options, qemu_args, qemu_help
from kvmsnap_plugin.vm.clone_options import ClonePolicy, refuse_unclonable
from kvmsnap_plugin.vm.qemu_args import Option, parse_argv

QEMU = "qemu-system-x86_64"


def decide(option: str, value: str | None = None, **policy) -> bool:
    return ClonePolicy(**policy).keeps(Option(option.lstrip("-"), value))


def refusal(option: str, value: str | None = None, **policy) -> str:
    with pytest.raises(VMError) as info:
        decide(option, value, **policy)
    return info.value.one_line()


@pytest.mark.parametrize(("option", "value"), [
    ("-machine", "q35,accel=tcg"), ("-M", "pc"), ("-accel", "tcg"), ("-cpu", "qemu64"),
    ("-m", "1G"), ("-smp", "2"), ("-numa", "node,memdev=m0"), ("-name", "web"),
    ("-uuid", "25246d01-e5b0-4c22-a6a3-2a0b33c64519"), ("-rtc", "base=utc"),
    ("-kernel", "/boot/vmlinuz"), ("-initrd", "/boot/initrd"), ("-append", "quiet"),
    ("-bios", "/usr/share/seabios/bios.bin"), ("-smbios", "type=1,serial=x"),
    ("-fw_cfg", "name=opt/x,string=y"), ("-vga", "std"), ("-nodefaults", None),
    ("-no-user-config", None), ("-enable-kvm", None), ("-mem-prealloc", None),
    ("-icount", "shift=auto"), ("-overcommit", "mem-lock=off"), ("-usbdevice", "tablet"),
    ("-global", "kvm-pit.lost_tick_policy=discard"),
    ("-global", "driver=ICH9-LPC,property=disable_s3,value=1"),
    ("-device", "virtio-net-pci,netdev=n0"), ("-device", "qemu64-x86_64-cpu,host-phys-bits=on"),
    ("-device", '{"driver":"isa-debugcon","chardev":"dbg","iobase":"0x402"}'),
    ("-netdev", "tap,id=n0,ifname=tap0"), ("-netdev", "stream,id=n1,addr.type=unix"),
    ("-nic", "user,model=e1000"), ("-net", "nic"), ("-chardev", "socket,id=c,path=/x.sock"),
    ("-debugcon", "unix:/run/x.sock,server=on"), ("-virtioconsole", "file:/var/log/c"),
    ("-serial", "pty"), ("-audio", "alsa,model=hda"), ("-audiodev", "pa,id=a"),
    ("-action", "shutdown=pause"), ("-pflash", "/vm/vars.fd"), ("-cdrom", "/srv/x.iso"),
])
def test_the_machine_and_what_is_rewritten_are_kept(option, value):
    assert decide(option, value)


@pytest.mark.parametrize(("option", "value"), [
    ("-gdb", "unix:/run/gdb.sock,server=on,wait=off"), ("-s", None),
    ("-trace", "events=/etc/ev,file=/var/log/trace"), ("-D", "/var/log/qemu.log"),
    ("-d", "guest_errors"), ("-qmp", "unix:/run/vm.qmp,server=on"), ("-monitor", "stdio"),
    ("-mon", "chardev=mon0"), ("-pidfile", "/run/vm.pid"), ("-daemonize", None),
    ("-runas", "qemu"), ("-chroot", "/var/empty"), ("-sandbox", "on"),
    ("-add-fd", "fd=3,set=1"), ("-incoming", "defer"), ("-loadvm", "snap1"), ("-S", None),
    ("-preconfig", None), ("-vnc", ":1"), ("-spice", "port=5900"), ("-display", "gtk"),
    ("-nographic", None), ("-full-screen", None), ("-no-shutdown", None),
    ("-async-teardown", None), ("-run-with", "async-teardown=on"),
])
def test_the_parents_own_sockets_files_and_settings_are_dropped(option, value):
    assert not decide(option, value)


@pytest.mark.parametrize("kind", ["filter-dump", "filter-buffer", "filter-mirror",
                                  "filter-redirector", "filter-rewriter"])
def test_network_filters_are_dropped(kind):
    assert not decide("object", f"{kind},id=f0,netdev=n0,file=/var/log/dump.pcap")


@pytest.mark.parametrize("value", [
    "memory-backend-ram,id=m0,size=1G", "memory-backend-memfd,id=m0,size=1G,share=off",
    '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
    "secret,id=s0,data=x", "iothread,id=io0", "rng-random,id=r0,filename=/dev/urandom",
    "rng-random,id=r0", "rng-builtin,id=r0", "throttle-group,id=t0,x-bps-total=1000",
    "tls-creds-x509,id=t0,dir=/etc/pki/qemu,endpoint=server", "authz-simple,id=a0,identity=x",
    "main-loop,id=ml0", "thread-context,id=tc0,cpu-affinity=0",
    "cryptodev-backend-builtin,id=c0",
])
def test_objects_kvmsnap_knows_are_kept(value):
    assert decide("object", value)


def test_a_file_memory_backend_in_a_directory_is_private_to_each_qemu(tmp_path):
    assert decide("object", f"memory-backend-file,id=m0,size=1G,mem-path={tmp_path}")
    (tmp_path / "ram").touch()
    says = refusal("object", f"memory-backend-file,id=m0,size=1G,mem-path={tmp_path}/ram")
    assert "memory-backend-file off hugetlbfs" in says and "--clone-drop" not in says


@pytest.mark.parametrize("share", ["share=on", "share=yes", "share=y", "share=true",
                                   "share"])
@pytest.mark.parametrize("kind", ["memory-backend-ram", "memory-backend-memfd",
                                  "memory-backend-file"])
def test_shared_guest_ram_is_refused_in_every_spelling(tmp_path, kind, share):
    says = refusal("object", f"{kind},id=m0,size=1G,mem-path={tmp_path},{share}")
    assert "share=on" in says and "--clone-drop" not in says


def test_shared_guest_ram_is_refused_in_json_and_through_global(tmp_path):
    assert "share=on" in refusal("object", json.dumps({
        "qom-type": "memory-backend-memfd", "id": "m0", "size": 1 << 30, "share": True}))
    assert "share=on" in refusal("global", "memory-backend-file.share=y")


@pytest.mark.parametrize(("option", "value", "says"), [
    ("-set", "netdev.n0.restrict=off", "-set, whose effect kvmsnap cannot see"),
    ("-readconfig", "/etc/vm.cfg", "-readconfig, whose effect"),
    ("-plugin", "/usr/lib/libhowvec.so", "TCG plugin"),
    ("-frobnicate", "x", "-frobnicate, which kvmsnap has no rule for"),
    ("-qtest", "unix:/x", "-qtest, which kvmsnap has no rule for"),
])
def test_options_kvmsnap_cannot_judge_are_refused_and_may_be_dropped(option, value, says):
    line = refusal(option, value)
    name = option.lstrip("-")
    assert says in line and f"({option} {value})" in line
    assert f"pass --clone-drop {name}; otherwise back the VM up offline" in line
    assert "\n" not in line
    assert not decide(option, value, drops=frozenset({name}))


@pytest.mark.parametrize(("option", "value", "says"), [
    ("-tpmdev", "passthrough,id=t0,path=/dev/tpm0", "host TPM"),
    ("-tpmdev", "emulator,id=t0,chardev=c0", "TPM emulator"),
    ("-fsdev", "local,id=f0,path=/srv,security_model=none", "9p"),
    ("-virtfs", "local,path=/srv,mount_tag=t,security_model=none", "9p"),
    ("-mem-path", "/dev/hugepages", "-mem-path"),
    ("-snapshot", None, "temporary disks"),
    ("-semihosting-config", "enable=on", "semihosting"),
    ("-xen-domid", "3", "Xen"),
    ("-usbdevice", "braille", "USB device"),
    ("-icount", "shift=auto,rr=record,rrfile=/var/lib/replay.bin", "record/replay"),
    ("-netdev", "vhost-user,id=n0,chardev=c0", "vhost-user network backend"),
    ("-netdev", '{"type":"vhost-vdpa","id":"n0","vhostdev":"/dev/vhost-vdpa-0"}', "vhost-vdpa"),
    ("-netdev", "frob,id=n0", "network backend of type frob"),
    ("-global", "vfio-pci.x-igd-opregion=on", "VFIO"),
    ("-global", "usb-storage.hostbus=1", "reaches the host (hostbus=)"),
])
def test_state_or_files_of_the_parents_are_refused_for_good(option, value, says):
    line = refusal(option, value)
    assert says in line and "back this VM up offline" in line and "--clone-drop" not in line


@pytest.mark.parametrize("driver", [
    "vfio-pci,host=0000:01:00.0", "vfio-ap,sysfsdev=/sys/x", "vhost-user-fs-pci,chardev=c",
    "vhost-scsi-pci,wwpn=x", "vhost-vsock-pci,guest-cid=3", "vhost-vdpa-device-pci",
    "usb-host,hostbus=1,hostaddr=2", "usb-redir,chardev=c", "u2f-passthru,hidraw=/dev/h",
    "u2f-emulated,dir=/etc/u2f", "virtio-input-host-pci,evdev=/dev/input/event0",
    "ccid-card-passthru,chardev=c", "ccid-card-emulated,backend=nss-emulated",
    "ivshmem-plain,memdev=m0", "pci-assign,host=01:00.0", "xen-pci-passthrough,hostaddr=1",
    "usb-mtp,rootdir=/srv",
    # a frontend that is fine, with a property that reaches the host
    "virtio-net-pci,netdev=n0,fd=3", "nvme,drive=d0,path=/dev/nvme0",
    '{"driver":"e1000","netdev":"n0","vhostfd":"12"}',
])
def test_devices_that_reach_host_resources_are_refused(driver):
    line = refusal("device", driver)
    assert "the VM cannot be forked" in line and "--clone-drop" not in line


@pytest.mark.parametrize("kind", [
    "input-linux,id=i0,evdev=/dev/input/event0", "colo-compare,id=c0",
    "pr-manager-helper,id=p0,path=/run/pr.sock", "dbus-vmstate,id=d0,addr=x",
    "can-host-socketcan,id=c0,if=can0,canbus=b0", "sev-guest,id=s0",
    "memory-backend-epc,id=e0,size=1M", "frobnicator,id=x",
])
def test_other_objects_are_refused_and_may_be_dropped_by_type(kind):
    qom_type = kind.split(",")[0]
    line = refusal("object", kind)
    assert f"an object of type {qom_type} kvmsnap has no rule for" in line
    assert f"pass --clone-drop object:{qom_type};" in line
    assert not decide("object", kind, drops=frozenset({f"object:{qom_type}"}))


def test_a_random_number_source_is_only_the_hosts_own():
    line = refusal("object", "rng-random,id=r0,filename=/run/entropy.fifo")
    assert "random number source" in line and "--clone-drop" not in line


def test_an_option_the_parents_binary_does_not_list_is_refused():
    known = QemuOptions(frozenset({"S"}), frozenset({"m", "debugcon"}))
    assert decide("debugcon", "null", known=known)
    line = refusal("virtioconsole", "null", known=known)
    assert "-virtioconsole, which the VM's own QEMU binary does not list" in line
    assert "--clone-drop virtioconsole" in line


def test_the_binarys_options_decide_which_take_a_value():
    argv = [QEMU, "-frob", "-m", "1G", "-S"]
    assert parse_argv(argv)[1] == [Option("frob", "-m"), Option("", "1G"), Option("S")]
    known = QemuOptions(frozenset({"frob", "S"}), frozenset({"m"}))
    assert parse_argv(argv, known)[1] == [Option("frob"), Option("m", "1G"), Option("S")]


@pytest.mark.parametrize("drop", ["device", "m", "drive", "netdev", "chardev", "object",
                                  "fsdev", "tpmdev", "object:memory-backend-ram",
                                  "object:secret"])
def test_what_the_machine_needs_cannot_be_dropped(drop):
    with pytest.raises(UsageError, match=f"--clone-drop {drop}: kvmsnap keeps or refuses"):
        ClonePolicy(drops=frozenset({drop}))


@pytest.mark.parametrize("drop", ["device:virtio-net-pci", "netdev:n0", "", "a b"])
def test_a_clone_drop_names_an_option_or_an_object_type(drop):
    with pytest.raises(UsageError, match="cannot drop"):
        ForkOptions(clone_drop=(drop,))
    assert ForkOptions(clone_drop=("-set", "object:input-linux")).clone_drop == (
        "set", "object:input-linux")


def test_every_option_has_one_rule_and_every_rewrite_a_handler():
    tables = [clone_options.KEPT, clone_options.REWRITTEN, clone_options.DROPPED,
              frozenset(clone_options.REFUSED)]
    for index, table in enumerate(tables):
        for other in tables[index + 1:]:
            assert not table & other
    # checked, then kept or rewritten (a TPM is always refused, by type)
    assert set(clone_options.CHECKED) <= clone_options.KEPT | clone_options.REWRITTEN | {
        "tpmdev"}
    assert frozenset(clone_argv._HANDLERS) == clone_options.REWRITTEN
    assert not clone_options.KEPT_OBJECTS & clone_options.DROPPED_OBJECTS


def test_a_whole_command_line_is_refused_at_its_first_bad_option():
    with pytest.raises(VMError, match=r"\(-gdbx unix:/x\)"):
        refuse_unclonable([QEMU, "-m", "256", "-gdbx", "unix:/x", "-set", "a.b.c=d"])
    refuse_unclonable([QEMU, "-m", "256", "-gdbx", "unix:/x", "-set", "a.b.c=d"],
                      drops=("gdbx", "set"))


# -- the parent binary's options -------------------------------------------------------------------
HELP = """\
QEMU emulator version 7.2.22
usage: qemu-system-x86_64 [options] [disk_image]

Standard options:
-h or -help     display this help and exit
-machine [type=]name[,prop[=value][,...]]
                selects emulated machine ('-machine help' for list)
-fda/-fdb file  use 'file' as floppy disk 0/1 image
-S              freeze CPU at startup (use 'c' to start execution)
-D logfile      output log to logfile (default stderr)
-dtb    file    use 'file' as device tree image
--preconfig     pause QEMU before machine is initialized (experimental)
-no-user-config
                do not load default user-provided config files at startup
-dump-vmstate <file>
                Output vmstate information in JSON format to file.
-async-teardown enable asynchronous teardown
-watchdog-action reset|shutdown|poweroff|inject-nmi|pause|debug|none
                action when watchdog fires [default=reset]
-xen-domid-restrict     restrict set of available xen operations
-netdev user,id=str[,ipv4=on|off]
-netdev hubport,id=str,hubid=n[,netdev=nd]
"""


def test_the_help_text_says_which_options_take_a_value():
    known = qemu_args.parse_help(HELP)
    assert known.flags == {"h", "help", "S", "preconfig", "no-user-config", "async-teardown",
                           "xen-domid-restrict"}
    assert known.with_value == {"machine", "M", "fda", "fdb", "D", "dtb", "dump-vmstate",
                                "watchdog-action", "netdev"}


def test_a_binary_is_asked_once_until_it_changes(tmp_path):
    calls = tmp_path / "calls"
    binary = tmp_path / "qemu-fake"
    binary.write_text(f"#!/bin/sh\necho x >> {calls}\ncat <<'END'\n{HELP}END\n")
    binary.chmod(0o755)
    first = qemu_help.binary_options(str(binary))
    assert first is not None and "machine" in first.with_value
    assert qemu_help.binary_options(str(binary)) == first
    assert calls.read_text().count("x") == 1
    binary.write_text(binary.read_text().replace("-S ", "-Q "))  # an upgrade
    assert "Q" in qemu_help.binary_options(str(binary)).flags
    assert calls.read_text().count("x") == 2


def test_a_binary_that_is_no_qemu_is_never_run(tmp_path):
    assert qemu_help.parent_options(os.getpid()) is None  # python, not a QEMU
    not_qemu = tmp_path / "qemu-not"
    not_qemu.write_text("#!/bin/sh\necho usage: nothing\n")
    not_qemu.chmod(0o755)
    assert qemu_help.binary_options(str(not_qemu)) is None  # its help lists no -machine


# -- how the operator says it ----------------------------------------------------------------------
def test_clone_drop_comes_from_the_command_line_and_the_config(tmp_path):
    from kvmsnap_plugin import cli
    from kvmsnap_plugin.config import load_config

    args = cli.build_parser().parse_args(["fork", "--domain", "web", "--clone-drop",
                                          "debugcon", "--clone-drop", "object:input-linux"])
    assert cli._job_from_args(args).fork.clone_drop == ("debugcon", "object:input-linux")
    config = tmp_path / "kvmsnap.toml"
    config.write_text('[defaults]\nclone_drop = ["set"]\nkeep = "/k"\n'
                      '[[vm]]\nqmp = "/run/a.qmp"\n'
                      '[[vm]]\nqmp = "/run/b.qmp"\nclone_drop = ["-plugin"]\n')
    (a, b), _run = load_config(config, {})
    assert (a.fork.clone_drop, b.fork.clone_drop) == (("set",), ("plugin",))
    config.write_text('[[vm]]\nqmp = "/run/a.qmp"\nclone_drop = "set"\n')
    with pytest.raises(UsageError, match=r"clone_drop: expected a list"):
        load_config(config, {})


class DescribedBackend:
    """A backend that only describes a VM with the given command line."""

    def __init__(self, *argv: str) -> None:
        self.argv = (QEMU, *argv)

    def describe(self) -> Parent:
        return Parent(None, 999999999, "web", self.argv, (7, 2, 0), ())


def test_the_parent_is_checked_as_it_is_described_with_the_operators_drops():
    from kvmsnap_plugin.fork.engine import ParentHandle

    backend = DescribedBackend("-m", "256", "-set", "device.nic0.mac=52:54:00:12:34:99")
    with pytest.raises(VMError, match="-set, whose effect"):
        ParentHandle(backend).describe()
    parent = ParentHandle(backend, ("set",)).describe()
    assert parent.clone_drop == ("set",) and parent.qemu_options is None  # no such process
    assert clone_options.policy_of(parent) == ClonePolicy(frozenset({"set"}), None, 999999999)
