"""The clone: the parent's command line, rewritten so the copy touches nothing of the parent's.

Same machine type, accelerator and devices (the RAM stream must fit them), but:
disks -> throw-away overlays on the frozen images; network backends isolated (a user-mode
backend is kept, it has migration state of its own, with ``restrict=on`` and no forwards;
tap/bridge/socket backends belong to the parent and become isolated user-mode ones); every
chardev -> null (serial, parallel, console, monitors); display and audio none; a private QMP
socket; no daemonize/pidfile/logfile; ``-S -incoming defer``. NIC links are set down before
the guest runs, so it sees its cable unplugged.

libvirt's command lines (read from ``/proc/PID/cmdline``, which is what really runs, unlike
``domxml-to-native``) need a little more: the monitor arrives as an inherited fd and the
serial log through an fd set (``-add-fd``), neither of which a clone has, so both become
ordinary chardevs like any other; ``-sandbox`` goes (the clone is our own child); options
come in JSON; and ``-object secret,...,file=.../master-key.aes`` names a file that vanishes
with the domain, so the clone reads a copy taken at fork time (:func:`copy_master_key`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import CloneDisk, ClonePlan, Parent, ParentDisk
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.parent import option_fields
from kvmsnap_plugin.vm.qemu_args import (
    KeyVal,
    Option,
    build_argv,
    escape,
    parse_argv,
    parse_blockdev,
    render_blockdev,
)

log = logging.getLogger("kvmsnap")

STATE_FD_NAME = "kvmsnap-incoming"
#: options whose effect belongs to the parent process alone
DROPPED = frozenset({"qmp", "qmp-pretty", "monitor", "mon", "daemonize", "pidfile", "D",
                     "incoming", "S", "loadvm", "vnc", "spice", "runas", "chroot",
                     "no-shutdown", "display", "nographic", "writeconfig",
                     "sandbox", "add-fd"})
ISOLATED_NETDEV_KEYS = ("hostfwd", "guestfwd", "smb", "smbserver", "tftp", "bootfile")
HARD_DISK_SHORTCUTS = ("hda", "hdb", "hdc", "hdd")
#: libvirt's per-run key for the secrets it hands QEMU (in the domain's runtime directory)
MASTER_KEY = "master-key.aes"






def plan_clone(parent: Parent, workdir: Path, sockets: Path,
               console_log: Path | None = None) -> ClonePlan:
    """The clone's command line and disks (pure: nothing is created)."""
    if parent.offline:
        raise VMError(f"{parent.name} is shut off: there is nothing to clone",
                      "its disk images are consistent as they are: back them up directly")
    disks = tuple(CloneDisk(d.device, workdir / f"clone-{safe_name(d.device)}.qcow2",
                            Path(d.filename), d.format) for d in parent.writable_disks)
    qmp_path = sockets / "clone-qmp.sock"
    agent = sockets / "clone-qga.sock" if agent_chardev_ids(list(parent.argv)) else None
    argv = rewrite_argv(list(parent.argv), parent.writable_disks, disks, qmp_path, console_log,
                        workdir=workdir, agent_socket=agent)
    return ClonePlan(tuple(argv), disks, workdir, qmp_path, console_log, agent)


def agent_chardev_ids(argv: list[str]) -> set[str]:
    """Chardevs behind a ``virtserialport`` named ``org.qemu.guest_agent.0``."""
    ids = set()
    for option in parse_argv(argv)[1]:
        if option.name == "device":  # key=value, or JSON as libvirt writes it
            opts = option_fields(option.value or "", "driver")
            if opts.get("name") == "org.qemu.guest_agent.0" and opts.get("chardev"):
                ids.add(opts["chardev"])
    return ids


def prepare_overlays(plan: ClonePlan, disks: Sequence[ParentDisk]) -> None:
    """Create the clone's overlays; the frozen images need not be frozen yet (``-u``)."""
    for clone_disk, disk in zip(plan.disks, disks, strict=True):
        create_overlay(clone_disk.overlay, disk.filename, disk.format, disk.virtual_size)


# -- command line rewriting --------------------------------------------------------------------
def rewrite_argv(argv: list[str], parent_disks: Sequence[ParentDisk],
                 clone_disks: Sequence[CloneDisk], qmp_path: Path,
                 console_log: Path | None, *, workdir: Path | None = None,
                 agent_socket: Path | None = None) -> list[str]:
    """The clone's command line; files it needs a private copy of go into ``workdir``."""
    program, options = parse_argv(argv)
    agent_ids = agent_chardev_ids(argv)
    workdir = workdir or qmp_path.parent
    by_file = {os.path.realpath(d.filename): c for d, c in zip(parent_disks, clone_disks,
                                                                strict=True)}
    rewritten: list[Option] = []
    used: set[str] = set()
    file_nodes: dict[str, CloneDisk] = {}
    serial_chardevs = _serial_chardev_ids(options)
    console_taken = console_log is None
    for option in options:
        name, value = option.name, option.value or ""
        if name in DROPPED:
            continue
        if name == "chardev" and agent_socket and _chardev_id(value) in agent_ids:
            # The guest agent's channel: the clone's own private socket, for the ladder.
            rewritten.append(Option("chardev", f"socket,id={_chardev_id(value)},"
                                               f"path={escape(agent_socket)},server=on,wait=off"))
        elif name == "chardev":
            keep_console = not console_taken and _chardev_id(value) in serial_chardevs[:1]
            rewritten.append(Option("chardev", _null_chardev(value, console_log if
                                                             keep_console else None)))
            console_taken = console_taken or keep_console
        elif name in ("serial", "parallel"):
            if not value.startswith("chardev:") and value != "none":
                if name == "serial" and not console_taken:
                    value = f"file:{escape(console_log)}"
                    console_taken = True
                else:
                    value = "null"
            rewritten.append(Option(name, value))
        elif name == "drive":
            rewritten.append(Option(name, _rewrite_drive(value, by_file, used)))
        elif name in HARD_DISK_SHORTCUTS or (name == "" and value):
            clone = by_file.get(os.path.realpath(value))
            if clone:
                used.add(str(clone.overlay))
                value = str(clone.overlay)
            rewritten.append(Option(name, value))
        elif name == "blockdev":
            rewritten.append(Option(name, _rewrite_blockdev(value, by_file, used, file_nodes)))
        elif name in ("netdev", "net", "nic"):
            rewritten.append(Option(name, _isolate_network(name, value)))
        elif name == "audiodev":
            audio_id = option_fields(value, "driver").get("id")
            rewritten.append(Option(name, f"none,id={audio_id}"))
        elif name == "object" and master_key_of(value):
            rewritten.append(Option(name, _private_master_key(value, workdir)))
        else:
            rewritten.append(option)
    _fix_blockdev_formats(rewritten, file_nodes)
    missing = [c.device for c in clone_disks if str(c.overlay) not in used]
    if missing:
        raise VMError(f"disk(s) {', '.join(missing)} are not on the VM's command line as "
                      "they are now (hot-plugged, or the image chain changed since start)",
                      "restart the VM with its current disks, or back it up offline")
    rewritten += [Option("display", "none"), Option("S"), Option("no-reboot"),
                  Option("qmp", f"unix:{escape(qmp_path)},server=on,wait=off"),
                  Option("incoming", "defer")]
    return build_argv(program, rewritten)


def _serial_chardev_ids(options: Sequence[Option]) -> list[str]:
    ids = []
    for option in options:
        value = option.value or ""
        if option.name == "serial" and value.startswith("chardev:"):
            ids.append(value.split(":", 1)[1])
        elif option.name == "device":
            fields = option_fields(value, "driver")
            if re.match(r"^(isa-serial|pci-serial)$", fields.get("driver", "")) and \
                    fields.get("chardev"):
                ids.append(fields["chardev"])
    return ids


def _chardev_id(value: str) -> str | None:
    return option_fields(value, "backend").get("id")


# -- libvirt's master key ------------------------------------------------------------------------
def master_key_of(value: str) -> Path | None:
    """The libvirt master key file a ``-object secret`` reads, if that is what it is."""
    fields = option_fields(value, "qom-type")
    path = fields.get("file") or ""
    if fields.get("qom-type") == "secret" and Path(path).name == MASTER_KEY:
        return Path(path)
    return None


def clone_master_key(workdir: Path) -> Path:
    return workdir / MASTER_KEY


def copy_master_key(argv: Sequence[str], workdir: Path, root: Path = Path("/")) -> Path | None:
    """Copy the parent's master key for the clone (0600), while the domain still runs.

    libvirt deletes the domain's runtime directory when the domain stops; the clone starts
    later and must still find the key its secrets are encrypted with. ``root`` is where the
    parent's filesystem is seen from here: ``/proc/PID/root`` reaches a file as the parent
    sees it, also when its libvirtd runs in a mount namespace of its own.
    """
    _, options = parse_argv(list(argv))
    named = next((key for o in options if o.name == "object"
                  for key in [master_key_of(o.value or "")] if key), None)
    if named is None:
        return None
    source = root / str(named).lstrip("/")
    target = clone_master_key(workdir)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        raise VMError(f"cannot copy the domain's master key {source}: {exc.strerror}",
                      "run kvmsnap as root on the VM's host") from None
    finally:
        os.close(fd)
    return target


def _private_master_key(value: str, workdir: Path) -> str:
    key = str(clone_master_key(workdir))
    if value.lstrip().startswith("{"):
        spec = json.loads(value)
        spec["file"] = key
        return json.dumps(spec, separators=(",", ":"))
    opts = KeyVal.parse(value, implied="qom-type")
    opts.set("file", key)
    return opts.render(implied="qom-type")


def _null_chardev(value: str, console_log: Path | None) -> str:
    chardev_id = _chardev_id(value)
    if console_log is not None:
        return f"file,id={chardev_id},path={escape(console_log)}"
    return f"null,id={chardev_id}"


def _rewrite_drive(value: str, by_file: dict[str, CloneDisk], used: set[str]) -> str:
    opts = KeyVal.parse(value)
    clone = by_file.get(os.path.realpath(opts.get("file") or ""))
    if clone is None:
        return value
    opts.set("file", str(clone.overlay))
    opts.set("format", "qcow2")
    opts.drop("snapshot", "locking")
    used.add(str(clone.overlay))
    return opts.render()


def _rewrite_blockdev(value: str, by_file: dict[str, CloneDisk], used: set[str],
                      file_nodes: dict[str, CloneDisk]) -> str:
    spec = parse_blockdev(value)
    clone = _blockdev_clone(spec, by_file)
    if clone is None:
        return value
    if spec.get("driver") == "file":
        spec["filename"] = str(clone.overlay)
        file_nodes[spec.get("node-name", "")] = clone
    else:  # a format node with an inline file child
        spec["file"]["filename"] = str(clone.overlay)
        _as_overlay_format(spec)
    used.add(str(clone.overlay))
    return render_blockdev(spec)


def _blockdev_clone(spec: dict[str, Any], by_file: dict[str, CloneDisk]) -> CloneDisk | None:
    if spec.get("driver") == "file":
        return by_file.get(os.path.realpath(str(spec.get("filename", ""))))
    child = spec.get("file")
    if isinstance(child, dict) and child.get("driver") == "file":
        return by_file.get(os.path.realpath(str(child.get("filename", ""))))
    return None


def _as_overlay_format(spec: dict[str, Any]) -> None:
    """A format node now reads a qcow2 overlay whose header names its backing file."""
    if spec.get("driver") not in ("qcow2", "raw"):
        raise VMError(f"disk format {spec.get('driver')} cannot be cloned",
                      "kvmsnap handles qcow2 and raw images")
    if spec.get("driver") == "raw" and ({"offset", "size"} & spec.keys()):
        raise VMError("raw disks with offset/size cannot be cloned", "use a whole image")
    spec["driver"] = "qcow2"
    spec.pop("backing", None)


def _fix_blockdev_formats(options: list[Option], file_nodes: dict[str, CloneDisk]) -> None:
    """Format nodes stacked on a rewritten file node become qcow2 (the overlay's format)."""
    for option in options:
        if option.name != "blockdev" or not file_nodes:
            continue
        spec = parse_blockdev(option.value or "")
        if isinstance(spec.get("file"), str) and spec["file"] in file_nodes:
            _as_overlay_format(spec)
            option.value = render_blockdev(spec)


def _isolate_network(name: str, value: str) -> str:
    """Cut the clone off the network: only an isolated user-mode backend, no forwards."""
    if value.lstrip().startswith("{"):
        return _isolate_json_netdev(value)
    implied = "type"
    opts = KeyVal.parse(value, implied=implied)
    kind = opts.get("type") or ""
    if kind in ("nic", "none", "hubport", ""):
        return value
    keep = {"id", "name", "model", "mac", "netdev"} if name == "nic" else {"id", "name"}
    if kind == "user":
        opts.drop(*ISOLATED_NETDEV_KEYS)
    else:
        opts = KeyVal([(k, v) for k, v in opts.pairs if k in keep])
        opts.pairs.insert(0, ("type", "user"))
    opts.set("restrict", "on")
    return opts.render(implied=implied)


def _isolate_json_netdev(value: str) -> str:
    """The same for libvirt's JSON ``-netdev`` (a tap's fds are the parent's alone)."""
    spec = json.loads(value)
    if spec.get("type") == "user":
        for key in ISOLATED_NETDEV_KEYS:
            spec.pop(key, None)
    else:
        spec = {"type": "user", "id": spec.get("id")}
    spec["restrict"] = True
    return json.dumps(spec, separators=(",", ":"))


# -- running the clone ---------------------------------------------------------------------------
class Clone(Machine):
    """A running clone: loaded from the RAM state, NICs unplugged, still paused."""

    def __init__(self, plan: ClonePlan, on_start: Callable[[int], None] | None) -> None:
        super().__init__(plan.argv, qmp_path=plan.qmp_path, name="clone",
                         console_log=plan.console_log,
                         stderr_log=plan.workdir / "clone.stderr", on_start=on_start)
        self.plan = plan
        self.restore_s = 0.0


@contextlib.contextmanager
def running_clone(plan: ClonePlan, state_file: Path, timeout: float = 300.0,
                  on_start: Callable[[int], None] | None = None) -> Iterator[Clone]:
    """Start the clone from the RAM state file; the file is deleted once loaded.

    The clone is paused on entry (``-S``): the caller runs it and presses its power button.
    On exit it is always ended (soft, then hard). ``on_start`` learns its PID at once.
    """
    clone = Clone(plan, on_start)
    try:
        with clone:
            started = time.monotonic()
            _load_state(clone, state_file, timeout)
            clone.restore_s = time.monotonic() - started
            _unplug_nics(clone)
            yield clone
    finally:
        state_file.unlink(missing_ok=True)


def _load_state(clone: Clone, state_file: Path, timeout: float) -> None:
    fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        clone.qmp.send_fd(fd, STATE_FD_NAME)
    finally:
        os.close(fd)
    clone.qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
    faults.point("clone-loading")
    deadline = time.monotonic() + timeout
    while True:
        status = clone.qmp.execute("query-migrate").get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or not clone.running():
            raise VMError(f"the clone could not load the RAM state ({status}): "
                          f"{clone.stderr_tail()}",
                          "the VM's devices changed since it started (hot-plug?); "
                          "back it up offline")
        if time.monotonic() > deadline:
            raise VMError(f"the clone did not load its RAM within {timeout:g} s")
        time.sleep(0.02)
    # The state holds the guest's secrets: gone as soon as it is loaded.
    state_file.unlink(missing_ok=True)
    log.info("clone restored from the fork's RAM image")


def nic_names(clone: Machine) -> list[str]:
    """Names of the clone's NICs, from ``info network`` (all NIC models, not only virtio)."""
    text = clone.qmp.hmp("info network")
    return re.findall(r"^\s*\\?\s*(\S+): index=\d+,type=nic", text, re.MULTILINE)


def _unplug_nics(clone: Clone) -> None:
    for name in nic_names(clone):
        clone.qmp.execute("set_link", {"name": name, "up": False})
        log.debug("clone NIC %s: link down", name)
