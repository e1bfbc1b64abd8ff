"""The clone's command line: the parent's, rewritten so the copy touches nothing of the parent's.

What the clone may have at all is decided by the allow-list in
:mod:`kvmsnap_plugin.vm.clone_options` (kept, rewritten, dropped or refused, with its
table); this module does the rewriting. Same machine type, accelerator and devices (the
RAM stream must fit them), but: disks -> throw-away overlays on the frozen images;
network backends isolated (a user-mode backend is kept, it has migration state of its
own, with ``restrict=on`` and no forwards; tap/bridge/socket backends belong to the parent
and become isolated user-mode ones); every chardev -> null (serial, parallel, debugcon,
console, monitors), the device staying; audio driver none; ``-action`` without
``shutdown=``; a private QMP socket; ``-S -incoming defer``.

libvirt's command lines (read from ``/proc/PID/cmdline``, which is what really runs, unlike
``domxml-to-native``) need a little more: the monitor arrives as an inherited fd and the
serial log through an fd set (``-add-fd``), neither of which a clone has, so both become
ordinary chardevs like any other; ``-sandbox`` goes (the clone is our own child); options
come in JSON; and ``-object secret,...,file=.../master-key.aes`` names a file that vanishes
with the domain, so the clone reads a copy taken at fork time (:func:`copy_master_key`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import CloneDisk, ParentDisk
from kvmsnap_plugin.vm.clone_options import ClonePolicy
from kvmsnap_plugin.vm.clone_secrets import secret_for_clone
from kvmsnap_plugin.vm.qemu_args import (
    KeyVal,
    Option,
    build_argv,
    escape,
    option_fields,
    parse_argv,
    parse_blockdev,
    render_blockdev,
)

ISOLATED_NETDEV_KEYS = ("hostfwd", "guestfwd", "smb", "smbserver", "tftp", "bootfile")
#: ``-hda IMAGE`` and its kin: a drive named by its image alone
IMAGE_SHORTCUTS = ("hda", "hdb", "hdc", "hdd", "pflash", "fda", "fdb", "sd", "mtdblock",
                   "cdrom")
#: libvirt's per-run key for the secrets it hands QEMU (in the domain's runtime directory)
MASTER_KEY = "master-key.aes"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
#: the protocol drivers of the disks kvmsnap forks: image files and host block devices
PROTOCOLS = ("file", "host_device")


def rewrite_argv(argv: list[str], parent_disks: Sequence[ParentDisk],
                 clone_disks: Sequence[CloneDisk], qmp_path: Path,
                 console_log: Path | None, *, workdir: Path | None = None,
                 agent_socket: Path | None = None,
                 policy: ClonePolicy | None = None) -> list[str]:
    """The clone's command line; files it needs a private copy of go into ``workdir``.

    ``policy`` decides what the clone may have (:func:`clone_options.policy_of` the
    parent: its ``--clone-drop`` and its binary's options); VMError for what it may not."""
    policy = policy or ClonePolicy()
    program, options = parse_argv(argv, policy.known)
    by_file = {os.path.realpath(d.filename): c for d, c in zip(parent_disks, clone_disks,
                                                                strict=True)}
    rewriter = _Rewriter(by_file, workdir or qmp_path.parent, console_log, agent_socket,
                         agent_chardev_ids(argv), _serial_chardev_ids(options))
    kept = [option for option in options if policy.keeps(option)]
    rewritten = [new for new in map(rewriter.rewrite, kept) if new is not None]
    _fix_blockdev_formats(rewritten, rewriter.file_nodes)
    _require_every_disk(clone_disks, rewriter.used)
    rewritten += [Option("display", "none"), Option("S"), Option("no-reboot"),
                  Option("qmp", f"unix:{escape(qmp_path)},server=on,wait=off"),
                  Option("incoming", "defer")]
    return build_argv(program, rewritten)


def agent_chardev_ids(argv: list[str]) -> set[str]:
    """Chardevs behind a ``virtserialport`` named ``org.qemu.guest_agent.0``."""
    ids = set()
    for option in parse_argv(argv)[1]:
        if option.name == "device":  # key=value, or JSON as libvirt writes it
            opts = option_fields(option.value or "", "driver")
            if opts.get("name") == GUEST_AGENT_PORT and opts.get("chardev"):
                ids.add(opts["chardev"])
    return ids


@dataclass
class _Rewriter:
    """Rewrites one option at a time; remembers what later checks need (disks used)."""

    by_file: dict[str, CloneDisk]  # the parent's disk images (real paths) -> clone disks
    workdir: Path
    console_log: Path | None
    agent_socket: Path | None
    agent_ids: set[str]
    serial_chardevs: list[str]
    used: set[str] = field(default_factory=set)  # overlays the command line now names
    file_nodes: dict[str, CloneDisk] = field(default_factory=dict)
    console_taken: bool = False

    def __post_init__(self) -> None:
        self.console_taken = self.console_log is None

    def rewrite(self, option: Option) -> Option | None:
        """The clone's version of an option the policy keeps; None leaves it out."""
        handler = _HANDLERS.get(option.name)
        if handler is None:
            return option
        value = option.value or ""
        new = handler(self, option.name, value)
        if new is None:
            return None
        return option if new == value else Option(option.name, new)

    def chardev(self, _name: str, value: str) -> str:
        chardev_id = _chardev_id(value)
        if self.agent_socket and chardev_id in self.agent_ids:
            # The guest agent's channel: the clone's own private socket, for the ladder.
            return (f"socket,id={chardev_id},path={escape(self.agent_socket)},"
                    "server=on,wait=off")
        keep_console = not self.console_taken and chardev_id in self.serial_chardevs[:1]
        self.console_taken = self.console_taken or keep_console
        if keep_console:
            return f"file,id={chardev_id},path={escape(self.console_log)}"
        # mux=on: several frontends share it (a serial port and a virtconsole, say)
        mux = option_fields(value, "backend").get("mux", "off") not in ("off", "false", "no")
        return f"null,id={chardev_id}" + (",mux=on" if mux else "")

    def char_port(self, name: str, value: str) -> str:
        """``-serial``/``-parallel``/``-debugcon``/``-virtioconsole`` with an inline
        backend: the console log or null (the device stays: the RAM stream has it)."""
        if value.startswith("chardev:") or value == "none":
            return value
        if name == "serial" and not self.console_taken:
            self.console_taken = True
            return f"file:{escape(self.console_log)}"
        return "null"

    def drive(self, _name: str, value: str) -> str:
        opts = KeyVal.parse(value)
        clone = self.by_file.get(os.path.realpath(opts.get("file") or ""))
        if clone is None:
            return value
        opts.set("file", str(clone.overlay))
        opts.set("format", "qcow2")
        opts.drop("snapshot", "locking")
        self.used.add(str(clone.overlay))
        return opts.render()

    def image_path(self, _name: str, value: str) -> str:
        """``-hda IMAGE`` or a bare image path."""
        clone = self.by_file.get(os.path.realpath(value)) if value else None
        if clone is None:
            return value
        self.used.add(str(clone.overlay))
        return str(clone.overlay)

    def blockdev(self, _name: str, value: str) -> str:
        spec = parse_blockdev(value)
        clone = _blockdev_clone(spec, self.by_file)
        if clone is None:
            return value
        if spec.get("driver") in PROTOCOLS:
            spec.update(driver="file", filename=str(clone.overlay))  # a file, even on a device
            self.file_nodes[spec.get("node-name", "")] = clone
        else:  # a format node with an inline file child
            spec["file"].update(driver="file", filename=str(clone.overlay))
            _as_overlay_format(spec)
        self.used.add(str(clone.overlay))
        return render_blockdev(spec, like=value)

    def network(self, name: str, value: str) -> str:
        return _isolate_network(name, value)

    def audiodev(self, _name: str, value: str) -> str:
        return f"none,id={option_fields(value, 'driver').get('id')}"

    def audio(self, _name: str, value: str) -> str:
        """``-audio DRIVER,model=M``: no sound card of the host's, the same model."""
        model = option_fields(value, "driver").get("model")
        return "none" + (f",model={escape(model)}" if model else "")

    def action(self, _name: str, value: str) -> str | None:
        """``shutdown=pause`` would keep a powered-off clone alive: the clone's own."""
        opts = KeyVal.parse(value)
        opts.drop("shutdown")
        return opts.render() or None

    def qom_object(self, _name: str, value: str) -> str:
        return secret_for_clone(value, self.workdir)


_HANDLERS: dict[str, Callable[[_Rewriter, str, str], str | None]] = {
    "chardev": _Rewriter.chardev,
    **{port: _Rewriter.char_port for port in ("serial", "parallel", "debugcon",
                                              "virtioconsole")},
    "drive": _Rewriter.drive,
    "": _Rewriter.image_path,
    **{shortcut: _Rewriter.image_path for shortcut in IMAGE_SHORTCUTS},
    "blockdev": _Rewriter.blockdev,
    "netdev": _Rewriter.network,
    "net": _Rewriter.network,
    "nic": _Rewriter.network,
    "audiodev": _Rewriter.audiodev,
    "audio": _Rewriter.audio,
    "action": _Rewriter.action,
    "object": _Rewriter.qom_object,
}


def _require_every_disk(clone_disks: Sequence[CloneDisk], used: set[str]) -> None:
    missing = [c.device for c in clone_disks if str(c.overlay) not in used]
    if missing:
        raise VMError(f"disk(s) {', '.join(missing)} are not on the VM's command line as "
                      "they are now (hot-plugged, or the image chain changed since start)",
                      "restart the VM with its current disks, or back it up offline")


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


# -- disks ---------------------------------------------------------------------------------------
def _blockdev_clone(spec: dict[str, Any], by_file: dict[str, CloneDisk]) -> CloneDisk | None:
    if spec.get("driver") in PROTOCOLS:
        return by_file.get(os.path.realpath(str(spec.get("filename", ""))))
    child = spec.get("file")
    if isinstance(child, dict) and child.get("driver") in PROTOCOLS:
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
            option.value = render_blockdev(spec, like=option.value or "")


# -- network -------------------------------------------------------------------------------------
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
