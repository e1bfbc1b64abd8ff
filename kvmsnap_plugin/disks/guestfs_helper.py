"""The libguestfs side of the guestfs route: run by ``/usr/bin/python3``, not by kvmsnap.

Debian's ``python3-guestfs`` binding is for the system Python only, so kvmsnap's venv starts
this file as a program (disks/guestfs_route.py, through host/process.py) and imports
nothing of kvmsnap here. It reads a JSON request on stdin::

    {"drives": [{"path": FILE or EXPORT, "format": "qcow2", "protocol": "nbd",
                 "server": ["unix:SOCKET"]}, ...], "fuse": DIR, "result": FILE,
     "smp": 2, "items": [{"where": "vdisk1/p3", "drive": 0, "partition": 3,
                          "kind": "lvm-pv" | "luks" | "filesystem", "key": FILE | null}]}

and opens every drive read-only in ONE appliance: LUKS volumes with their key files, the
LVM volume groups found, and every filesystem it is asked for or finds in a volume group,
each mounted read-only without journal replay under ``/m<N>`` of the appliance. Then it
exposes that tree through FUSE (``mount_local``) at ``DIR``, writes what it found to
``FILE`` (JSON, see :func:`_found`) and serves until ``DIR`` is unmounted; then it shuts the
appliance down. Exit 3: the binding is not installed.
"""

import base64
import json
import os
import struct
import sys

#: per filesystem type, read-only options that replay no journal
OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "ext2": "ro", "xfs": "ro,norecovery",
           "btrfs": "ro,rescue=nologreplay", "vfat": "ro", "ntfs": "ro"}
#: bytes read from each filesystem's start for the host's clean-shutdown verdict: the ext
#: superblock (1 KiB in), FAT's boot sector, btrfs' superblock (64 KiB in)
HEAD_BYTES = 72 * 1024
NOT_FILES = ("swap",)
#: an xfs log larger than this is not copied out for the host's xfs_logprint (it is read at
#: tens of MiB/s through the appliance): its verdict stays unknown
XFS_LOG_LIMIT = 256 << 20
CHUNK = 1 << 20  # pread_device's replies stay well under libguestfs' message limit


def main() -> int:
    try:
        import guestfs
    except ImportError:
        print("the libguestfs Python binding is not installed", file=sys.stderr)
        return 3
    request = json.load(sys.stdin)
    g = guestfs.GuestFS(python_return_dict=True)
    for drive in request["drives"]:  # a file, or an NBD export ("protocol", "server")
        g.add_drive_opts(drive.pop("path"), readonly=True, **drive)
    g.set_smp(int(request.get("smp", 1)))
    g.launch()
    try:
        found = _open_all(g, request)
        g.mount_local(request["fuse"], readonly=True)
        _write(request["result"], found)
        g.mount_local_run()
    finally:
        g.umount_all()
        g.shutdown()
        g.close()
    return 0


def _open_all(g, request) -> list:
    """Every filesystem to expose, as dicts (see :func:`_found`), mounted where it can be."""
    devices = g.list_devices()
    candidates = []  # (where, parent where, device)
    pvs = {}  # PV device -> the item (partition) it is on
    for item in request["items"]:
        device = devices[item["drive"]]
        if item["partition"]:
            device = _partition(g, device, item["partition"])
        if item["kind"] == "luks":
            opened = _open_luks(g, item, device)
            if isinstance(opened, dict):
                candidates.append(opened)
                continue
            device = opened
            if g.vfs_type(device) == "LVM2_member":
                pvs[device] = item
                continue
        elif item["kind"] == "lvm-pv":
            pvs[device] = item
            continue
        candidates.append({"where": item["where"], "parent": item["where"], "device": device})
    if pvs:
        candidates += _logical_volumes(g, pvs)
    for index, fs in enumerate(candidates):
        if "reason" not in fs:
            fs["dir"] = f"m{index}"
            g.mkmountpoint("/" + fs["dir"])
    scratch = os.path.dirname(request["result"])
    return [_mount(g, fs, scratch) if "reason" not in fs else fs for fs in candidates]


def _partition(g, device: str, number: int) -> str:
    wanted = [p for p in g.list_partitions()
              if g.part_to_dev(p) == device and g.part_to_partnum(p) == number]
    return wanted[0] if wanted else f"{device}{number}"


def _open_luks(g, item, device: str):
    """The opened mapper device, or the item with the reason it stays closed."""
    name = "luks-" + g.vfs_uuid(device)
    try:
        key = _key(item["key"])
        g.cryptsetup_open(device, key, name, readonly=True)
    except (OSError, RuntimeError, ValueError) as exc:
        return {"where": item["where"], "parent": item["where"], "device": device,
                "reason": f"LUKS volume did not open with its key: {_one_line(exc)}"}
    return "/dev/mapper/" + name


def _key(path: str) -> str:
    """The key file's bytes, exactly; libguestfs takes a key as text (UTF-8, no NUL)."""
    with open(path, "rb") as key_file:
        raw = key_file.read()
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        key = "\0"
    if "\0" in key:
        raise ValueError("libguestfs takes a key as UTF-8 text without NUL bytes, and this "
                         "key file is binary: add a text key to the volume, or use image mode")
    return key


def _logical_volumes(g, pvs) -> list:
    """Every LV of the volume groups on ``pvs``, named DISK/lvm/VG/LV by its first PV.

    PVs are matched by UUID, asked of each PV device by its libguestfs name: ``pvs_full``'s
    ``pv_name`` is the appliance kernel's name, untranslated, and the kernel probes the
    drives asynchronously, so its sda4 may be libguestfs' sdb4 (seen with two NBD drives)."""
    g.lvm_scan(True)
    by_uuid = {_bare_uuid(uuid): item for device, item in pvs.items()
               if (uuid := _quiet(g.pvuuid, device))}
    found = []
    for lv in sorted(g.lvs()):
        vg, name = lv.split("/")[-2:]
        item = next((by_uuid[uuid] for uuid in map(_bare_uuid, g.vgpvuuids(vg))
                     if uuid in by_uuid), None)
        if item is None:
            continue  # a volume group on no disk we were asked about
        disk = item["where"].split("/")[0]
        found.append({"where": f"{disk}/lvm/{vg}/{name}", "parent": item["where"],
                      "device": lv})
    return found


def _bare_uuid(uuid: str) -> str:
    """LVM prints a PV UUID with or without its dashes, depending on the call."""
    return uuid.strip().replace("-", "")


def _mount(g, fs, scratch: str) -> dict:
    """Mount read-only; note the type, label and first bytes (for the verdict)."""
    device = fs["device"]
    fs["fstype"] = g.vfs_type(device)
    fs["label"] = _quiet(g.vfs_label, device)
    fs["uuid"] = _quiet(g.vfs_uuid, device)
    if fs["fstype"] in NOT_FILES or not fs["fstype"]:
        fs["reason"] = f"{fs['fstype'] or 'no filesystem'}: nothing to mount"
        del fs["dir"]
        return fs
    fs["head"] = base64.b64encode(g.pread_device(device, HEAD_BYTES, 0)).decode()
    if fs["fstype"] == "xfs":
        fs["log_copy"] = xfs_log_copy(lambda size, offset: g.pread_device(device, size, offset),
                                      g.blockdev_getsize64(device),
                                      os.path.join(scratch, f"xfs-{fs['dir']}.img"))
    try:
        g.mount_options(OPTIONS.get(fs["fstype"], "ro"), device, "/" + fs["dir"])
    except RuntimeError as exc:
        fs["reason"] = f"mount failed inside libguestfs: {_one_line(exc)}"
        del fs["dir"]
    return fs


def xfs_log_copy(read, size: int, target: str):
    """A sparse copy of an xfs filesystem holding only its superblock and its internal log,
    which is all ``xfs_logprint -t`` reads: the host judges the log from it. ``read(size,
    offset)`` reads the device. None for an external or too large log."""
    superblock = read(4096, 0)
    if superblock[:4] != b"XFSB":
        return None
    blocksize, = struct.unpack_from(">I", superblock, 4)
    logstart, = struct.unpack_from(">Q", superblock, 48)
    agblocks, = struct.unpack_from(">I", superblock, 84)
    logblocks, = struct.unpack_from(">I", superblock, 96)
    agblklog = superblock[124]
    # logstart is an AG-encoded block number: AG in the high bits, the block in that AG below
    block = (logstart >> agblklog) * agblocks + (logstart & ((1 << agblklog) - 1))
    if not logstart or logblocks * blocksize > XFS_LOG_LIMIT:
        return None
    with open(target, "wb") as out:
        out.truncate(size)
        for start, length in ((0, 64 * 1024), (block * blocksize, logblocks * blocksize)):
            for offset in range(start, start + length, CHUNK):
                out.seek(offset)
                out.write(read(min(CHUNK, start + length - offset), offset))
    return target


def _quiet(call, device: str) -> str:
    try:
        return call(device)
    except RuntimeError:
        return ""


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def _write(path: str, found: list) -> None:
    temporary = path + ".part"
    with open(temporary, "w") as out:
        json.dump({"filesystems": found}, out)
    os.rename(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
