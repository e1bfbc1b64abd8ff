"""The parent VM: found through its QMP socket and described.

Everything later steps need to know about the running VM is read here, once, into a
:class:`Parent`: its process and command line, and its disks as QEMU sees them now.
Whether a clone of it can be built is decided in one place, before anything is touched:
:mod:`kvmsnap_plugin.vm.clone_options`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError, VMError
from kvmsnap_plugin.model import Parent, ParentDisk
from kvmsnap_plugin.vm.qemu_args import option_fields as option_fields  # it lived here
from kvmsnap_plugin.vm.qmp import Monitor


def discover(session: Monitor, qmp_socket: Path, pid: int) -> Parent:
    """Describe the running VM behind ``session`` (whether it can be cloned is for
    :func:`kvmsnap_plugin.vm.clone_options.clonable` to say)."""
    check_runstate(session)
    argv = read_cmdline(pid)
    version = session.execute("query-version")["qemu"]
    name = session.execute("query-name").get("name") or f"vm-{pid}"
    disks = block_disks(session.execute("query-block"))
    check_disks(name, disks)
    return Parent(qmp_socket, pid, name, tuple(argv),
                  (version["major"], version["minor"], version["micro"]), disks)


def check_disks(name: str, disks: Sequence[ParentDisk]) -> None:
    """Refuse a VM kvmsnap cannot back up: no writable disk, one that is not a file, or an
    encrypted one (the overlays kvmsnap puts on it would not be)."""
    if not any(not d.read_only for d in disks):
        raise VMError(f"{name} has no writable disk: there is nothing to back up",
                      "attach the VM's disks read-write, or back the images up directly")
    for disk in disks:
        # encrypted first: QEMU names an image opened with encryption options "json:{...}"
        if not disk.read_only and disk.encryption:
            kind = "" if disk.encryption == "encrypted" else f" ({disk.encryption.upper()})"
            raise VMError(f"disk {disk.device} of {name} is encrypted{kind}: kvmsnap's "
                          "overlays would hold the data written during the backup unencrypted",
                          "back it up offline (its images are encrypted as they are)")
        if not disk.read_only and not _is_local_file(disk.filename):
            raise VMError(f"disk {disk.device} of {name} is not a local image file "
                          f"({disk.filename})", "kvmsnap needs file-backed disks (qcow2/raw)")


def check_runstate(session: Monitor) -> None:
    state = session.runstate()
    if state in ("inmigrate", "postmigrate", "finish-migrate", "prelaunch") or \
            session.execute("query-migrate").get("status") in ("active", "setup",
                                                                "pre-switchover", "device"):
        raise VMError(f"the VM is migrating or not started (runstate {state})",
                      "wait until the migration has finished, then try again")
    if state == "paused":
        raise VMError("the VM is paused: a paused guest cannot shut its copy down",
                      "resume it (QMP `cont`, `virsh resume`), or back its disks up offline")
    if state != "running":
        raise VMError(f"the VM is not running (runstate {state})",
                      "start the VM, or back its disks up offline")


def read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        raise VMError(f"the QEMU process {pid} is gone", "is the VM still running?") from None
    except PermissionError:
        raise VMError(f"cannot read the command line of QEMU process {pid}",
                      "run kvmsnap as root") from None
    argv = raw.rstrip(b"\0").decode(errors="surrogateescape").split("\0")
    if not argv or "qemu" not in Path(argv[0]).name:
        raise VMError(f"process {pid} behind the socket is not QEMU ({argv[0]!r})",
                      "pass the QMP socket of a QEMU process")
    return argv


def block_disks(blocks: list[dict[str, Any]]) -> tuple[ParentDisk, ...]:
    """The disks in a QMP ``query-block`` answer (empty drives left out)."""
    return tuple(d for d in (_disk(b) for b in blocks) if d)


def _disk(block: dict[str, Any]) -> ParentDisk | None:
    inserted = block.get("inserted")
    if not inserted:
        return None  # an empty drive (no medium)
    image = inserted.get("image", {})
    chain, cursor = [], image
    while cursor:
        chain.append(cursor.get("filename", ""))
        cursor = cursor.get("backing-image")
    qdev = block.get("qdev", "")
    match = re.match(r"^/machine/peripheral/([^/]+)", qdev)
    device = match.group(1) if match else block.get("device") or inserted["node-name"]
    return ParentDisk(
        device=device,
        node=inserted["node-name"],
        filename=image.get("filename", inserted.get("file", "")),
        format=image.get("format", inserted.get("drv", "")),
        virtual_size=int(image.get("virtual-size", 0)),
        read_only=bool(inserted.get("ro")),
        chain=tuple(chain),
        encryption=_encryption(inserted, image),
        flash=bool(re.match(r"^/machine/[^/]+\.flash\d+$", qdev)),  # system.flash1 (x86)
    )


def _encryption(inserted: dict[str, Any], image: dict[str, Any]) -> str:
    """How the disk's chain is encrypted, "" if not at all. The whole chain counts: an
    encrypted base under a plain top image reports ``inserted.encrypted`` false."""
    cursor = image
    while cursor:
        specific = cursor.get("format-specific", {})
        if specific.get("type") == "luks":  # a raw LUKS image (format luks)
            return "luks"
        encrypt = specific.get("data", {}).get("encrypt")  # qcow2's encrypt.format
        if encrypt or cursor.get("encrypted"):
            return str((encrypt or {}).get("format") or "encrypted")
        cursor = cursor.get("backing-image")
    return "encrypted" if inserted.get("encrypted") else ""


def _is_local_file(filename: str) -> bool:
    return filename.startswith("/") and Path(filename).is_file()


def find_parent_socket(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise UsageError(f"no such QMP socket: {path}",
                         "start QEMU with -qmp unix:PATH,server=on,wait=off and pass PATH")
    return path


def qemu_uuid(pid: int) -> str | None:
    """The ``-uuid`` on a QEMU's command line, if it has one."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag in ("-uuid", "--uuid") and value:
            return value.lower()
    return None
