"""The parent VM: found through its QMP socket and described.

Everything later steps need to know about the running VM is read here, once, into a
:class:`Parent`: its process and command line, and its disks as QEMU sees them now.
Whether a clone of it can be built is decided in one place, before anything is touched:
:mod:`kvmsnap_plugin.vm.clone_options`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
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
    name = vm_name(session, qmp_socket)
    disks = block_disks(session.execute("query-block"))
    check_disks(name, disks)
    return Parent(qmp_socket, pid, name, tuple(argv),
                  (version["major"], version["minor"], version["micro"]), disks)


def vm_name(session: Monitor, qmp_socket: Path) -> str:
    """What the VM calls itself: QEMU's ``-name``, else its ``-uuid``, else the socket's
    stem (``/run/qemu/web.qmp`` -> web)."""
    name = session.execute("query-name").get("name")
    if name:
        return name
    uuid = session.execute("query-uuid").get("UUID", "")
    return uuid if uuid.strip("0-") else qmp_socket.stem  # all zeros: no -uuid given


def check_disks(name: str, disks: Sequence[ParentDisk]) -> None:
    """Refuse a VM kvmsnap cannot back up: no writable disk, one that is neither a local
    file nor a host block device, or an encrypted one (the overlays kvmsnap puts on it
    would not be)."""
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
        if not disk.read_only:
            check_storage(name, disk)


def check_storage(name: str, disk: ParentDisk) -> None:
    """A writable disk must be a local image file or a writable host block device: kvmsnap
    puts a qcow2 overlay file on top of it and commits the overlay back into it."""
    if disk.host_device:
        if _read_only_device(disk.filename):
            raise VMError(f"disk {disk.device} of {name} is the block device "
                          f"{disk.filename}, which the host kernel has made read-only: "
                          "kvmsnap could not commit the VM's writes back into it",
                          f"make it writable (`blockdev --setrw {disk.filename}`) or "
                          "attach the disk read-only")
        return
    if _is_relative(disk.filename):
        # QEMU resolved it against its working directory at start; kvmsnap cannot be sure
        # which file that was (QEMU may have changed directory since, e.g. -daemonize)
        raise VMError(f"disk {disk.device} of {name} is given by a relative path "
                      f"({disk.filename}): kvmsnap cannot tell for sure which file that is",
                      "start QEMU with absolute paths for its images and flash files "
                      "(libvirt always does)")
    if not _is_local_file(disk.filename):
        raise VMError(f"disk {disk.device} of {name} is {_storage_of(disk.filename)} "
                      f"({disk.filename}), not a local image file or host block device",
                      "kvmsnap needs qcow2/raw image files or host block devices: map a "
                      "network volume on the host (rbd map, iscsiadm, nbd-client) and give "
                      "QEMU its /dev path")


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
    filename = image.get("filename", inserted.get("file", ""))
    return ParentDisk(
        device=device,
        node=inserted["node-name"],
        filename=filename,
        format=image.get("format", inserted.get("drv", "")),
        virtual_size=int(image.get("virtual-size", 0)),
        read_only=bool(inserted.get("ro")),
        chain=tuple(chain),
        encryption=_encryption(inserted, image),
        host_device=is_block_device(filename),
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


def _is_relative(filename: str) -> bool:
    return bool(filename) and not filename.startswith(("/", "json:")) and \
        not re.match(r"^[a-z][a-z0-9.+-]*:", filename)


def _is_local_file(filename: str) -> bool:
    return filename.startswith("/") and Path(filename).is_file()


def is_block_device(filename: str) -> bool:
    """Is ``filename`` (as QEMU names the image) a host block device? QEMU opens it with
    its ``host_device`` driver then."""
    try:
        return filename.startswith("/") and stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        return False


def _read_only_device(device: str) -> bool:
    """The kernel's read-only flag of a block device (``blockdev --getro``)."""
    try:
        rdev = os.stat(device).st_rdev
        return Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/ro").read_text() \
            .strip() == "1"
    except OSError:
        return False  # no sysfs to ask: QEMU's own open for writing will have told


def _storage_of(filename: str) -> str:
    """What a disk that is no local file is, for people: "on the rbd protocol", ..."""
    if filename.startswith("json:"):
        try:
            node = json.loads(filename[5:])
            while isinstance(node.get("file"), dict):
                node = node["file"]  # down to the protocol node
            return f"on the {node.get('driver', 'unknown')} protocol"
        except (ValueError, AttributeError):
            return "an image QEMU describes in JSON"
    scheme = re.match(r"^([a-z][a-z0-9.-]*)(\+[a-z]+)?:", filename)
    if scheme:
        return f"on the {scheme.group(1)} protocol"
    return "neither a file nor a block device"


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
