"""The libguestfs route: what the host kernel cannot mount, archived all the same.

The native route (a host loop device and a read-only mount) reads ~100x faster, so it
stays for what the host can mount. What is left NOT ARCHIVED after it, and libguestfs can
read, goes here: LVM physical volumes (their volume groups' logical volumes), LUKS volumes
whose key file ``luks_keys`` names, and filesystems the host could not mount (vfat and
NTFS on kernels without them, a btrfs the host refused). All of a VM's disks are opened
read-only in ONE appliance (each start costs 20-60 s under TCG), from the NBD exports
qemu-storage-daemon already serves (disks/expose.py), by
``disks/guestfs_helper.py``, run by the system Python that has the binding; it mounts
every filesystem read-only without journal replay and serves them through FUSE in a
directory of the work dir. Each is bind-mounted under the mount root with a name a user
understands (``vdisk1/p5``, ``vdisk1/lvm/vg0/srv``), and listed as archived through
libguestfs. :func:`close` unmounts them all, which ends the helper and its appliance.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import subprocess
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmsnap_plugin.host import dirs, mounts, probes, process
from kvmsnap_plugin.model import (
    ExposedDisk,
    ExposedFilesystem,
    Outcome,
    PartKind,
    ProbeInfo,
    SkipRule,
)
from kvmsnap_plugin.paths import safe_name

log = logging.getLogger(__name__)

#: the Python the Debian binding (python3-guestfs) is installed for
GUESTFS_PYTHON = "/usr/bin/python3"
HELPER = Path(__file__).with_name("guestfs_helper.py")
INSTALL_HINT = "apt-get install libguestfs-tools python3-guestfs"
#: the appliance's start and the mounts under TCG on a loaded host
START_TIMEOUT = 900.0
#: how long the helper may take to shut its appliance down once unmounted
STOP_GRACE = 60.0
#: the route's name in the report
VIA = "libguestfs"


@dataclass
class Appliance:
    """The helper process serving the filesystems, and what :func:`close` undoes."""

    fuse: Path  # where the helper's FUSE tree is mounted (one directory per filesystem)
    process: subprocess.Popen[bytes] | None = None
    binds: list[Path] = field(default_factory=list)
    root: Path | None = None  # the mount root the binds are under
    #: sparse copies of xfs logs the helper wrote for the host's verdict, removed by close
    files: list[Path] = field(default_factory=list)


class Unavailable(Exception):
    """The route could not run: the reason each item stays NOT ARCHIVED."""


def helper_kind(fs: ExposedFilesystem, keys: Mapping[str, Path]) -> str | None:
    """What the helper is to do with a partition files mode left out, or None."""
    if fs.outcome is not Outcome.NOT_ARCHIVED:
        return None
    if fs.kind is PartKind.LVM_PV:
        return "lvm-pv"
    if fs.kind is PartKind.LUKS:
        return "luks" if fs.probed.uuid.lower() in keys else None
    if fs.kind in (PartKind.FILESYSTEM, PartKind.EFI_SYSTEM) and fs.fstype:
        return "filesystem"
    return None


def route(disks: Sequence[ExposedDisk], images: Sequence[tuple[str, Path, str]],
          root: Path, workdir: Path, *, keys: Iterable[tuple[str, Path]] = (),
          skip: Sequence[SkipRule] = (), recorder=None
          ) -> tuple[list[ExposedDisk], Appliance | None]:
    """The disks with what libguestfs could open archived (or why not), and the appliance
    to :func:`close` (None when nothing needed it)."""
    by_uuid = {uuid.lower(): Path(key) for uuid, key in keys}
    items = [{"where": fs.where, "drive": index, "partition": _number(fs.partition),
              "kind": kind, "key": str(by_uuid.get(fs.probed.uuid.lower(), "")) or None}
             for index, disk in enumerate(disks) for fs in disk.filesystems
             if (kind := helper_kind(fs, by_uuid))]
    if not items:
        return list(disks), None
    appliance = Appliance(workdir / "guestfs", root=root)
    try:
        found = _start(appliance, _drives(disks, images), items, workdir, recorder)
    except Unavailable as exc:
        close(appliance)
        wanted = {item["where"] for item in items}
        return [_left_out(disk, wanted, str(exc)) for disk in disks], None
    except BaseException:  # interrupted while the appliance starts: never leave it running
        close(appliance)
        raise
    try:
        return _apply(disks, items, found, appliance, skip, recorder), appliance
    except BaseException:
        close(appliance)
        raise


def close(appliance: Appliance | None) -> None:
    """Unmount the binds and the FUSE tree (the helper then shuts its appliance down and
    exits), end the helper if it does not, remove the directories made for the binds."""
    if appliance is None:
        return
    for bind in reversed(appliance.binds):
        mounts.unmount(bind)
        _remove_parents(bind, appliance.root)
    appliance.binds = []
    if mounts.is_mountpoint(appliance.fuse):
        process.run(["umount", appliance.fuse], timeout=120, check=False)
    if appliance.process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            appliance.process.wait(STOP_GRACE)
        process.end(appliance.process, grace=10)
        appliance.process = None
    if mounts.is_mountpoint(appliance.fuse):  # the helper died: its FUSE mount is stale
        process.run(["umount", "-l", appliance.fuse], timeout=60, check=False)
    with contextlib.suppress(OSError):
        appliance.fuse.rmdir()
    for path in appliance.files:
        path.unlink(missing_ok=True)


def helper_env() -> dict[str, str]:
    """libguestfs' own QEMU, run directly (no libvirt); TCG unless kvmsnap's probe found
    KVM working (on nested hosts KVM hangs)."""
    accel = probes.cached_accelerator()
    env = {**process.CLEAN_ENV, "LIBGUESTFS_BACKEND": "direct"}
    if not accel or accel[0] != "kvm":
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def _drives(disks: Sequence[ExposedDisk],
            images: Sequence[tuple[str, Path, str]]) -> list[dict]:
    """What the appliance opens: each disk's NBD export of qemu-storage-daemon (the image
    in its own format, read-only) where there is one, so that the appliance holds no lock
    on the images (a split backup's release commits into them while it still shuts down);
    else the image file in its format."""
    drives = []
    for disk, (_, image, image_format) in zip(disks, images, strict=True):
        uri = urllib.parse.urlsplit(disk.nbd_uri) if disk.nbd_uri else None
        if uri is None:
            drives.append({"path": str(image), "format": image_format})
            continue
        socket = urllib.parse.parse_qs(uri.query)["socket"][0]
        drives.append({"path": uri.path.lstrip("/"), "format": "raw", "protocol": "nbd",
                       "server": [f"unix:{socket}"]})
    return drives


def _start(appliance: Appliance, drives: list[dict], items: list,
           workdir: Path, recorder) -> list[dict]:
    """Start the helper and wait until its filesystems are served; what it found."""
    if not Path(GUESTFS_PYTHON).exists():
        raise Unavailable(f"libguestfs is not installed ({INSTALL_HINT})")
    dirs.private_dir(appliance.fuse, "the libguestfs mount point")
    result, stderr_path = workdir / "guestfs.json", workdir / "guestfs.stderr"
    result.unlink(missing_ok=True)
    stderr_path.unlink(missing_ok=True)  # a previous appliance's, in the same work dir
    request = {"drives": drives,
               "fuse": str(appliance.fuse), "result": str(result), "smp": 2, "items": items}
    if recorder is not None:
        recorder.append("mounts", str(appliance.fuse))
    dirs.create_file(stderr_path)
    started = time.monotonic()
    with open(stderr_path, "wb") as err:
        appliance.process = process.spawn([GUESTFS_PYTHON, HELPER], stdin=subprocess.PIPE,
                                          stderr=err, env=helper_env(), inherit_env=False)
    with contextlib.suppress(BrokenPipeError):  # it exited at once: _wait says why
        appliance.process.stdin.write(json.dumps(request).encode())
        appliance.process.stdin.close()
    _wait(appliance, result, stderr_path)
    log.info("libguestfs appliance up in %.1f s", time.monotonic() - started)
    found = json.loads(result.read_text())["filesystems"]
    # close() deletes these: only files in our private work dir, where the helper was told
    # to write them (beside its result), are taken
    appliance.files += [Path(f["log_copy"]) for f in found
                        if f.get("log_copy") and Path(f["log_copy"]).parent == workdir]
    return found


def _wait(appliance: Appliance, result: Path, stderr_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not result.exists():
        code = appliance.process.poll()
        if code is not None:
            if code == 3:
                raise Unavailable(f"libguestfs is not installed ({INSTALL_HINT})")
            lines = stderr_path.read_text(errors="replace").strip().splitlines()
            raise Unavailable(f"libguestfs failed: {lines[-1] if lines else code}")
        if time.monotonic() > deadline:
            raise Unavailable(f"the libguestfs appliance did not start in {START_TIMEOUT:g} s")
        time.sleep(0.2)


def _apply(disks: Sequence[ExposedDisk], items: list, found: list[dict],
           appliance: Appliance, skip: Sequence[SkipRule], recorder) -> list[ExposedDisk]:
    """Each item's partition replaced by what the helper made of it; logical volumes added
    to the disk of their volume group's first physical volume."""
    by_where = {f["where"]: f for f in found}
    parents = {f["parent"] for f in found if f["where"] != f["parent"]}
    wanted = {item["where"] for item in items}
    result = []
    for disk in disks:
        kept = []
        for fs in disk.filesystems:
            if fs.where in parents:
                kept.append(_opened(fs, [f["where"] for f in found if f["parent"] == fs.where]))
            elif fs.where in by_where:
                kept.append(_served(fs, by_where[fs.where], appliance, skip, recorder))
            elif fs.where in wanted:
                kept.append(replace(fs, reason=f"{fs.reason}; libguestfs found nothing in it"))
            else:
                kept.append(fs)
        for f in found:
            if f["where"] != f["parent"] and f["where"].split("/")[0] == disk.name:
                volume = _volume(disk.name, f)
                kept.append(_served(volume, f, appliance, skip, recorder))
        result.append(replace(disk, filesystems=tuple(kept)))
    return result


def _opened(fs: ExposedFilesystem, inside: list[str]) -> ExposedFilesystem:
    """A container (LVM PV, LUKS holding LVM): its volumes are listed on their own."""
    opened = "LUKS volume opened with its key, LVM inside; " if fs.kind is PartKind.LUKS else ""
    return replace(fs, outcome=Outcome.OPENED,
                   reason=f"{opened}volumes listed on their own: {', '.join(inside)}")


def _volume(disk: str, found: dict) -> ExposedFilesystem:
    """A logical volume the helper found: a filesystem of its own in the report."""
    probed = ProbeInfo(found.get("fstype", ""), found.get("label", ""), found.get("uuid", ""))
    kind = PartKind.SWAP if probed.type == "swap" else PartKind.FILESYSTEM
    volume = ExposedFilesystem(disk, found["where"].split("/", 1)[1], Path(found["device"]),
                               probed.type, None, kind, Outcome.NOT_ARCHIVED, "", probed,
                               route=VIA)
    return replace(volume, **_inner(found))


def _inner(found: dict) -> dict:
    """What the verdict of a filesystem the host has no device of reads: the sparse copy of
    its xfs log (as its device), or its first bytes."""
    if found.get("log_copy"):
        return {"device": Path(found["log_copy"]), "head": b""}
    return {"head": base64.b64decode(found.get("head", ""))}


def _served(fs: ExposedFilesystem, found: dict, appliance: Appliance,
            skip: Sequence[SkipRule], recorder) -> ExposedFilesystem:
    """Bind-mount what the helper mounted under the mount root, or say why not."""
    fstype = found.get("fstype") or fs.fstype
    fs = replace(fs, fstype=fstype, route=VIA)
    if fs.kind is PartKind.LUKS:  # what is inside is archived, under the LUKS volume's name
        fs = replace(fs, **_inner(found))
    rule = next((r for r in skip if r.matches(fs)), None)
    if rule is not None:
        return replace(fs, outcome=Outcome.SKIPPED_BY_CONFIG, reason=f"skip_partitions {rule}")
    if fs.kind is PartKind.SWAP:
        return replace(fs, outcome=Outcome.SKIPPED_BY_RULE, reason="swap holds no files")
    if "dir" not in found:
        return replace(fs, outcome=Outcome.NOT_ARCHIVED,
                       reason=f"{VIA}: {found.get('reason', 'not mounted')}")
    target = appliance.root / safe_name(fs.disk) / fs.partition
    dirs.private_dir(target, "a mount point")
    if recorder is not None:
        recorder.append("mounts", str(target))
    appliance.binds.append(target)
    mounts.bind_mount(appliance.fuse / found["dir"], target)
    return replace(fs, mountpoint=target, outcome=Outcome.ARCHIVED,
                   reason=f"archived through {VIA} (read-only {fstype}, the host cannot "
                          "mount it)")


def _left_out(disk: ExposedDisk, wanted: set[str], why: str) -> ExposedDisk:
    return replace(disk, filesystems=tuple(
        replace(fs, reason=f"{fs.reason}; {why}") if fs.where in wanted else fs
        for fs in disk.filesystems))


def _number(partition: str) -> int:
    """``p5`` -> 5; a whole-disk filesystem -> 0."""
    return int(partition[1:]) if partition.startswith("p") else 0


def _remove_parents(path: Path, root: Path | None) -> None:
    """The empty directories made for a bind (``ROOT/vdisk1/lvm/vg0``), up to the root."""
    parent = path.parent
    while root is not None and parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent
