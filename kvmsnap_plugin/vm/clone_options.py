"""What of the parent's command line its clone may have: an allow-list, decided before the pause.

Every option of the parent's command line is kept, rewritten, dropped or refused; so is
every ``-object`` type, ``-netdev`` type and ``-device`` driver. Anything kvmsnap has no
rule for, or that the parent's own binary does not list, is refused (VMError, exit 2)
while the VM runs untouched. ``--clone-drop NAME`` (``NAME`` or ``object:TYPE``) leaves out
what the operator knows to serve the parent alone; only options that are not part of the
guest's machine can be dropped (a missing device breaks the RAM stream).

======================================  ============  ======================================
parent's option                         clone         why
======================================  ============  ======================================
machine M accel cpu smp m numa boot     kept          the machine the RAM state fits
name uuid rtc vga k usb msg seed ...    kept          (see :data:`KEPT`)
kernel initrd append dtb bios L         kept          read-only host files
option-rom acpitable smbios fw_cfg
device                                  kept          frontends are guest-side; refused:
                                                      drivers and properties that reach
                                                      host resources (:data:`HOST_DEVICES`,
                                                      :data:`HOST_PROPERTIES`)
global                                  kept          unless it sets a refused property
drive blockdev hda..hdd pflash fda fdb  rewritten     the parent's writable disks -> the
sd mtdblock cdrom (image)                             clone's overlays; others as they are
chardev                                 rewritten     null (guest agent, console: ours)
serial parallel debugcon virtioconsole  rewritten     null: the device stays, its host end
                                                      goes (serial 0: the console log)
netdev net nic                          rewritten     isolated user-mode; vhost-user and
                                                      vhost-vdpa refused
audiodev audio                          rewritten     driver none (the sound model stays)
action                                  rewritten     without shutdown= (a clone powers off)
object                                  per type      see below
qmp qmp-pretty monitor mon gdb s        dropped       the parent's sockets, files, terminals
trace D d dfilter pidfile daemonize                   and ways out; kvmsnap adds its own
runas chroot sandbox run-with add-fd                  QMP, -S, -incoming, -display none
incoming loadvm S preconfig                           (plan_clone: its own -sandbox)
vnc spice sdl curses display
nographic full-screen no-shutdown
writeconfig async-teardown dump-vmstate
set readconfig plugin                   refused       kvmsnap cannot see what they do
                                                      (may be dropped)
fsdev virtfs mem-path snapshot tpmdev   refused       state or files the parent holds
icount rr= semihosting* xen-*
usbdevice (not tablet/mouse/keyboard)
anything else                           refused       no rule (may be dropped)
======================================  ============  ======================================

``-object`` types: memory-backend-ram/memfd kept, memory-backend-file kept on hugetlbfs or
a directory (QEMU then makes an unlinked file of its own), ``share=`` true in any spelling
refused (on/yes/y/true, a bare ``share``; note memfd is shared by default, harmless while
no other process gets its fd); secret (libvirt's master key: a private copy), iothread,
rng-random (only /dev/urandom, /dev/random, /dev/hwrng), rng-builtin, rng-egd (its
chardev is null), throttle-group, tls-creds-*, tls-cipher-suites, authz-*, main-loop,
thread-context, cryptodev-backend-builtin, can-bus kept; filter-* dropped (they act on a
network the clone does not have; a dump writes the parent's file); anything else refused
(input-linux, colo-compare, pr-manager-helper, dbus-vmstate, can-host-socketcan,
sev-guest, memory-backend-epc, unknown types), which ``--clone-drop object:TYPE`` may drop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvmsnap_plugin.errors import UsageError, VMError
from kvmsnap_plugin.host.resources import hugetlbfs_page_size
from kvmsnap_plugin.model import Parent, QemuOptions
from kvmsnap_plugin.vm.qemu_args import KeyVal, Option, option_fields, parse_argv
from kvmsnap_plugin.vm.qemu_help import parent_options

#: kept as they are (read-only host files, the machine's description, harmless settings)
KEPT = frozenset({
    "machine", "M", "accel", "cpu", "smp", "m", "numa", "boot", "name", "uuid", "rtc",
    "vga", "k", "usb", "msg", "seed", "compat", "echr", "overcommit", "realtime",
    "mem-prealloc", "only-migratable", "singlestep", "win2k-hack", "no-fd-bootchk",
    "no-hpet", "no-acpi", "enable-kvm", "nodefaults", "no-user-config", "nouserconfig",
    "no-reboot", "enable-sync-profile", "iscsi", "watchdog-action", "watchdog",
    "kernel", "initrd", "append", "dtb", "bios", "L", "option-rom", "acpitable", "smbios",
    "fw_cfg", "portrait", "rotate",
    "device", "global", "icount", "usbdevice",  # checked first (CHECKED)
})
#: kept once rewritten (clone_argv.py has a handler for each)
REWRITTEN = frozenset({
    "drive", "blockdev", "", "hda", "hdb", "hdc", "hdd", "pflash", "fda", "fdb", "sd",
    "mtdblock", "cdrom", "chardev", "serial", "parallel", "debugcon", "virtioconsole",
    "netdev", "net", "nic", "audiodev", "audio", "action", "object",
})
#: left out of the clone: the parent's own sockets, files, terminals and process settings
DROPPED = frozenset({
    "qmp", "qmp-pretty", "monitor", "mon", "gdb", "s", "trace", "D", "d", "dfilter",
    "pidfile", "daemonize", "runas", "chroot", "sandbox", "run-with", "add-fd", "incoming",
    "loadvm", "S", "preconfig", "vnc", "spice", "sdl", "curses", "display", "nographic",
    "full-screen", "no-frame", "alt-grab", "ctrl-grab", "show-cursor", "no-shutdown",
    "writeconfig", "async-teardown", "dump-vmstate", "audio-help",
})


@dataclass(frozen=True)
class Refusal:
    """Why a clone cannot have an option; ``droppable``: ``--clone-drop`` may leave it out."""

    what: str
    droppable: bool = False
    hint: str = ""  # the fix, where the general one would mislead

    def error(self, name: str, value: str, drop: str) -> VMError:
        shown = f"-{name} {value}".strip() if name else value
        if len(shown) > 100:
            shown = shown[:97] + "..."
        hint = self.hint or (
            f"if it only serves the parent, pass --clone-drop {drop}; otherwise back the VM "
            "up offline" if self.droppable else "back this VM up offline, or remove it from "
            "the VM")
        return VMError(f"the VM cannot be forked: it has {self.what} ({shown})", hint)


def _unseen(name: str) -> Refusal:
    return Refusal(f"-{name}, whose effect kvmsnap cannot see", droppable=True)


REFUSED = {
    "set": _unseen("set"),
    "readconfig": _unseen("readconfig"),
    "plugin": Refusal("a TCG plugin (-plugin), host code kvmsnap cannot see",
                      droppable=True),
    "fsdev": Refusal("a host directory shared into the guest (9p): the clone would write "
                     "to it"),
    "mem-path": Refusal("guest RAM in a file (-mem-path)"),
    "snapshot": Refusal("temporary disks (-snapshot): their images cannot be reopened"),
    "semihosting": Refusal("semihosting: the guest reaches the host's files"),
    "semihosting-config": Refusal("semihosting: the guest reaches the host's files"),
    "xen-domid": Refusal("a Xen domain"),
    "xen-attach": Refusal("a Xen domain"),
    "xen-domid-restrict": Refusal("a Xen domain"),
}
REFUSED["virtfs"] = REFUSED["fsdev"]

#: -device drivers that reach host resources a second copy cannot have
HOST_DEVICES = (
    (re.compile(r"^vfio"), "a VFIO passthrough device"),
    (re.compile(r"^vhost-user"), "a vhost-user device"),
    (re.compile(r"^vhost-"), "a vhost device bound to the host kernel"),
    (re.compile(r"^ivshmem"), "shared memory with the host (ivshmem)"),
    (re.compile(r"^(pci-assign|kvm-pci-assign|usb-host|usb-redir|u2f-passthru)$"),
     "a passed-through host device"),
    (re.compile(r"^(virtio-input-host|ccid-card-)"), "a host input or smart card device"),
    (re.compile(r"^u2f-"), "a U2F key with host state"),
    (re.compile(r"^usb-mtp$"), "a host directory shared into the guest (usb-mtp)"),
    (re.compile(r"^xen"), "a Xen device"),
)
#: -device (and -global) properties that name a host resource
HOST_PROPERTIES = frozenset({
    "host", "hostbus", "hostaddr", "hostport", "hostdevice", "sysfsdev", "evdev",
    "vhostfd", "vhostfds", "fd", "fds", "path", "rootdir", "hidraw",
})
NETWORK_TYPES = frozenset({
    "user", "tap", "bridge", "socket", "stream", "dgram", "l2tpv3", "vde", "netmap",
    "af-xdp", "vmnet-host", "vmnet-shared", "vmnet-bridged", "hubport", "nic", "none", "",
})
KEPT_OBJECTS = frozenset({
    "memory-backend-ram", "memory-backend-memfd", "memory-backend-file", "secret",
    "iothread", "rng-random", "rng-builtin", "rng-egd", "throttle-group", "tls-creds-anon",
    "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "authz-simple", "authz-list",
    "authz-list-file", "authz-pam", "main-loop", "thread-context",
    "cryptodev-backend-builtin", "can-bus",
})
DROPPED_OBJECTS = frozenset({"filter-dump", "filter-buffer", "filter-mirror",
                             "filter-redirector", "filter-rewriter", "filter-replay"})
RANDOM_SOURCES = frozenset({"/dev/urandom", "/dev/random", "/dev/hwrng"})
USB_SHORTCUTS = frozenset({"tablet", "mouse", "keyboard"})
#: QEMU's spellings of a true boolean (qapi_bool_parse); a bare key means on too
TRUE = frozenset({"on", "yes", "y", "true", ""})


@dataclass(frozen=True)
class ClonePolicy:
    """Decides each option of one parent's command line for its clone."""

    drops: frozenset[str] = frozenset()  # --clone-drop: option names, object:TYPE
    known: QemuOptions | None = None  # the parent binary's options (None: not probed)
    pid: int | None = None  # the parent, whose view of files counts (memory-backend-file)

    def __post_init__(self) -> None:
        refuse_bad_drops(self.drops)

    def keeps(self, option: Option) -> bool:
        """True: the clone has ``option`` (maybe rewritten); False: it is left out.

        Raises VMError for an option the clone cannot have."""
        name, value = option.name, option.value or ""
        if self.known is not None and name and not self.known.knows(name):
            refusal: Refusal | None = Refusal(f"-{name}, which the VM's own QEMU binary does "
                                              "not list", droppable=True)
        elif name in DROPPED:
            return False
        elif name == "object":
            return self._object(value)
        else:
            refusal = _refusal(name, value, self.pid)
        if refusal is None:
            return True
        if refusal.droppable and name in self.drops:
            return False
        raise refusal.error(name, value, name)

    def _object(self, value: str) -> bool:
        fields = option_fields(value, "qom-type")
        kind = fields.get("qom-type", "")
        if kind in DROPPED_OBJECTS:
            return False
        if kind in KEPT_OBJECTS:
            refusal = _object_refusal(kind, fields, self.pid)
        else:
            refusal = Refusal(f"an object of type {kind or '(none)'} kvmsnap has no rule "
                              "for", droppable=True)
        if refusal is None:
            return True
        if refusal.droppable and f"object:{kind}" in self.drops:
            return False
        raise refusal.error("object", value, f"object:{kind}")


def refuse_bad_drops(drops: Iterable[str]) -> None:
    """``--clone-drop`` leaves out only what kvmsnap would refuse, never the machine."""
    for drop in drops:
        kind = drop.removeprefix("object:")
        machine = (kind in KEPT_OBJECTS if drop.startswith("object:") else
                   drop in KEPT | REWRITTEN | CHECKED.keys() or
                   (drop in REFUSED and not REFUSED[drop].droppable))
        if machine:
            raise UsageError(f"--clone-drop {drop}: kvmsnap keeps or refuses this itself; "
                             "dropping it would change the machine the RAM state fits",
                             "drop only options kvmsnap refuses with a --clone-drop hint")


# -- one option at a time ------------------------------------------------------------------------
def _refusal(name: str, value: str, pid: int | None) -> Refusal | None:
    if name in REFUSED:
        return REFUSED[name]
    check = CHECKED.get(name)
    if check:
        return check(value, pid)
    if name in KEPT or name in REWRITTEN:
        return None
    return Refusal(f"-{name}, which kvmsnap has no rule for", droppable=True)


def _device(value: str, _pid: int | None) -> Refusal | None:
    fields = option_fields(value, "driver")
    return _host_device(fields.get("driver", ""), set(fields))


def _host_device(driver: str, properties: set[str]) -> Refusal | None:
    for pattern, what in HOST_DEVICES:
        if pattern.search(driver):
            return Refusal(what)
    reaching = sorted(HOST_PROPERTIES & properties)
    if reaching:
        return Refusal(f"a device property that reaches the host ({reaching[0]}=)")
    return None


def _global(value: str, _pid: int | None) -> Refusal | None:
    """``-global driver.property=value`` or ``driver=D,property=P,value=V``."""
    fields = option_fields(value, "")
    if "driver" in fields:
        driver, prop, setting = (fields.get("driver", ""), fields.get("property", ""),
                                 fields.get("value", ""))
    else:
        key, setting = next(iter(KeyVal.parse(value).pairs), ("", ""))
        driver, _, prop = key.partition(".")
    if prop == "share" and (setting or "").lower() in TRUE:
        return Refusal("guest RAM shared with other processes (share=on)")
    return _host_device(driver, {prop})


def _network(value: str, _pid: int | None) -> Refusal | None:
    kind = option_fields(value, "type").get("type", "")
    if kind in ("vhost-user", "vhost-vdpa"):
        return Refusal(f"a {kind} network backend, whose state lives outside QEMU")
    if kind not in NETWORK_TYPES:
        return Refusal(f"a network backend of type {kind} kvmsnap has no rule for")
    return None


#: what to do instead (leaving the TPM out of the clone cannot work: the guest's TPM device
#: is part of the machine its RAM state fits, so no drop is offered)
SWTPM_HINT = ("back this VM up offline, with swtpm's state directory (e.g. "
              "/var/lib/libvirt/swtpm/UUID) beside its disks, or remove the vTPM")


def _tpm(value: str, _pid: int | None) -> Refusal:
    kind = option_fields(value, "type").get("type", "")
    if kind == "emulator":
        # The TPM's keys, PCRs and NVRAM live in the swtpm process, not in QEMU. QEMU does
        # carry swtpm's state blobs in its migration stream, so a clone could get a
        # private swtpm loaded from the RAM snapshot; but that swtpm's state would then
        # have to be archived and restored beside the disks (sealed keys, BitLocker), which
        # kvmsnap does not do: a backup without it would not restore a working guest.
        return Refusal("a vTPM (TPM emulator), whose state lives in its swtpm process, "
                       "outside QEMU and its RAM snapshot", hint=SWTPM_HINT)
    return Refusal(f"a host TPM ({kind or 'tpmdev'}), which one VM at a time can use")


def _icount(value: str, _pid: int | None) -> Refusal | None:
    if option_fields(value, "shift").get("rr"):
        return Refusal("record/replay (-icount rr=), whose file is the parent's")
    return None


def _usbdevice(value: str, _pid: int | None) -> Refusal | None:
    if value in USB_SHORTCUTS:
        return None
    return Refusal(f"a USB device kvmsnap has no rule for (-usbdevice {value})")


CHECKED: dict[str, Callable[[str, int | None], Refusal | None]] = {
    "device": _device, "global": _global, "netdev": _network, "net": _network,
    "nic": _network, "tpmdev": _tpm, "icount": _icount, "usbdevice": _usbdevice,
}


def _object_refusal(kind: str, fields: dict[str, str], pid: int | None) -> Refusal | None:
    if kind.startswith("memory-backend"):
        if "share" in fields and fields["share"].lower() in TRUE:
            return Refusal("guest RAM shared with other processes (share=on)")
        if kind == "memory-backend-file" and not _private_ram_file(fields, pid):
            return Refusal("guest RAM in a file the clone would open too (memory-backend-"
                           "file off hugetlbfs)")
    if kind == "rng-random" and fields.get("filename", "/dev/urandom") not in RANDOM_SOURCES:
        return Refusal(f"a random number source kvmsnap has no rule for "
                       f"({fields.get('filename')})")
    return None


def _private_ram_file(fields: dict[str, str], pid: int | None) -> bool:
    """On hugetlbfs (its own page pool), or a directory: QEMU then creates and unlinks a
    file of its own in it, which no other process opens."""
    path = fields.get("mem-path", "")
    if not path.startswith("/"):
        return False
    seen = Path(f"/proc/{pid}/root{path}") if pid else Path(path)
    return seen.is_dir() or hugetlbfs_page_size(path, pid) is not None


# -- the whole command line ----------------------------------------------------------------------
def policy_of(parent: Parent) -> ClonePolicy:
    """The policy :func:`clonable` checked ``parent`` with, for its clone's command line."""
    return ClonePolicy(frozenset(parent.clone_drop), parent.qemu_options, parent.pid)


def clonable(parent: Parent, drops: Sequence[str] = ()) -> Parent:
    """``parent``, checked against the allow-list before anything is touched (VMError if
    its clone cannot be built), with what the clone's command line is built from: the
    operator's drops and the options of the binary the parent runs."""
    known = parent_options(parent.pid)
    refuse_unclonable(list(parent.argv), drops, known, parent.pid)
    return replace(parent, clone_drop=tuple(drops), qemu_options=known)


def refuse_unclonable(argv: list[str], drops: Iterable[str] = (),
                      known: QemuOptions | None = None, pid: int | None = None) -> None:
    """Raise for the first option a clone of this command line cannot have."""
    policy = ClonePolicy(frozenset(drops), known, pid)
    _, options = parse_argv(argv, known)
    for option in options:
        policy.keeps(option)
    _refuse_passed_files(options)


def _refuse_passed_files(options: list[Option]) -> None:
    """``-add-fd`` is fine where only chardevs use its fd set (libvirt's serial log files:
    the clone's chardevs are replaced anyway); a disk or anything else opened through an
    fd set cannot be reopened by a clone, which does not inherit the parent's descriptors.
    """
    sets = {option_fields(o.value or "", "fd").get("set") for o in options
            if o.name == "add-fd"}
    for option in options:
        if option.name in ("add-fd", "chardev"):
            continue
        for used in re.findall(r"/dev/fdset/(\d+)", option.value or ""):
            if used in sets:
                raise VMError(f"the VM cannot be forked: -{option.name} opens a file passed "
                              f"as a descriptor (/dev/fdset/{used}), which a clone cannot "
                              "reopen", "back this VM up offline")
