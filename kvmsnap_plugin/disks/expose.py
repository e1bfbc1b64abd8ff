"""Expose the clone's disks read-only: raw image files, block devices, mounted filesystems.

No nbd module is needed: ``qemu-storage-daemon`` exports each qcow2 as a raw file through
FUSE (read-only), ``losetup -r -P`` turns that file into a block device with its partitions,
and each filesystem found is mounted read-only without journal replay (ext4 ``noload``, xfs
``norecovery``) and with ``nosuid,nodev,noexec`` under one private (0700) mount root:
``ROOT/<disk>`` for a whole-disk filesystem, ``ROOT/<disk>/p<N>`` for partitions.
:func:`unexpose` unmounts, detaches and stops the daemon, in that order.

The same daemon also exports each disk read-only over NBD on a unix socket in a private
(0700) socket directory (:attr:`ExposedDisk.nbd_uri`): restic's image mode streams the disk
from there with ``nbdcopy`` (plugin/archivers/stream.py), about twice as fast as reading
the FUSE file. The daemon binds that socket before it mounts the FUSE exports, so once
those are mounted, the NBD exports are served too.

Each image is opened in the format QEMU knows it by, never one guessed from its contents:
a raw disk whose guest wrote a qcow2 header (naming a host file as backing file) into it
is exposed as the raw bytes it is.

A firmware flash (OVMF's UEFI variable store, ``flash=``) holds no filesystem: it is
exported like a disk (image mode archives it as ``DISK.raw``), never classified or mounted,
and copied whole into the mount root as ``uefi-vars.fd`` for files mode (an extra file: it
is a few hundred KiB, and the image archives' copy of it deduplicates).
"""

from __future__ import annotations

import contextlib
import logging
import re
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from kvmsnap_plugin.disks import classify, guestfs_route, verify
from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.host import dirs, mounts, process
from kvmsnap_plugin.model import ExposedDisk, ExposedFilesystem, Exposure, Outcome, SkipRule
from kvmsnap_plugin.paths import safe_name, socket_dir
from kvmsnap_plugin.vm.qemu_args import escape

log = logging.getLogger(__name__)


class Recorder(Protocol):
    """Where each export, loop device and mount is noted before it is made (the journal)."""

    def record(self, **fields: Any) -> None: ...

    def append(self, key: str, value: Any) -> None: ...


class _Nowhere:
    """A recorder for exposures that need not survive a crash (tests, the demo)."""

    def record(self, **fields: Any) -> None:
        pass

    def append(self, key: str, value: Any) -> None:
        pass


@dataclass
class Exposed:
    """An :class:`Exposure` and what :func:`unexpose` must undo, in reverse."""

    view: Exposure
    daemon: subprocess.Popen[bytes] | None = None
    exports: list[Path] = field(default_factory=list)
    loops: list[Path] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    #: the NBD socket's private directory, removed by :func:`unexpose`
    sockets: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    nbd_uris: list[str] = field(default_factory=list)
    #: what the host cannot mount, served by libguestfs (disks/guestfs_route.py)
    appliance: guestfs_route.Appliance | None = None

#: the largest firmware flash copied into files mode (x86's pflash window: 64 MiB)
MAX_FLASH_BYTES = 64 << 20
#: the loop devices' read-ahead, in 512-byte sectors (4 MiB)
READ_AHEAD_SECTORS = 8192

#: what to expose: (name, image file, its format as QEMU opened it: "qcow2", "raw")
Image = tuple[str, Path, str]


@contextlib.contextmanager
def exposed(images: Sequence[Image], workdir: Path, root: Path, *,
            mount: bool = True, timeout: float = 60.0,
            recorder: Recorder | None = None, skip: Sequence[SkipRule] = (),
            flash: Collection[str] = (), luks_keys: Sequence[tuple[str, Path]] = (),
            guestfs: bool = True, direct_io: bool = False) -> Iterator[Exposure]:
    """:func:`expose`, undone on exit."""
    handle = expose(images, workdir, root, mount=mount, timeout=timeout, recorder=recorder,
                    skip=skip, flash=flash, luks_keys=luks_keys, guestfs=guestfs,
                    direct_io=direct_io)
    try:
        yield handle.view
    finally:
        unexpose(handle)


def expose(images: Sequence[Image], workdir: Path, root: Path, *,
           mount: bool = True, timeout: float = 60.0,
           recorder: Recorder | None = None, skip: Sequence[SkipRule] = (),
           flash: Collection[str] = (), luks_keys: Sequence[tuple[str, Path]] = (),
           guestfs: bool = True, direct_io: bool = False) -> Exposed:
    """Expose ``(name, image, format)``: raw views in ``workdir/images``, filesystems under
    ``root``. Undo with :func:`unexpose` (done here on failure).

    With a recorder (the journal), each export, loop device and mount is recorded before it
    is made, so recovery can undo them after a crash, and a split backup (``kvmsnap
    mount``) can leave them for ``kvmsnap release``. Every partition is classified
    (disks/classify.py); what ``skip`` names is not mounted. The disks ``flash`` names are
    firmware flashes: copied beside the trees (:func:`flash_file`), not classified. In files
    mode what the host cannot mount (LVM, LUKS with a key in ``luks_keys``, vfat, NTFS...) is
    opened through libguestfs (disks/guestfs_route.py) unless ``guestfs`` is False (image
    mode: its appliance costs 20-60 s and the images hold everything anyway).
    ``direct_io``: the loop devices read the exports with direct I/O, faster for reading
    whole disks (image archives), slower for files mode (see :func:`read_ahead`).
    """
    record = recorder or _Nowhere()
    dirs.private_dir(root, "the mount root")
    if any(root.iterdir()):
        raise HostError(f"the mount root {root} is not empty",
                        "an interrupted run? run `kvmsnap recover`, or pick another mount root")
    handle = Exposed(Exposure(root, workdir / "images"))
    try:
        _start_exports(handle, images, timeout, record)
        for (name, _, _), export, nbd_uri in zip(images, handle.exports, handle.nbd_uris,
                                                 strict=True):
            record.append("loop_files", str(export))
            loop = mounts.attach_loop(export, direct_io=direct_io)
            record.append("loops", str(loop))
            handle.loops.append(loop)
            read_ahead(loop)
            if direct_io and not mounts.loop_direct_io(loop):
                log.info("%s: its loop device reads without direct I/O (the kernel gave "
                         "none), image archives more slowly", name)
            filesystems = [] if name in flash else [
                _filesystem(handle, name, partition, device, mount, record, skip)
                for partition, device in mounts.block_devices(loop, timeout)]
            handle.view.disks.append(ExposedDisk(name, export, loop, tuple(filesystems),
                                                 nbd_uri))
        flashes = [(name, export) for (name, _, _), export in zip(images, handle.exports,
                                                                  strict=True) if name in flash]
        for name, export in flashes:
            add_file(handle.view, flash_file(name, len(flashes)), _flash_bytes(name, export),
                     record)
            log.info("%s is a firmware flash (the UEFI variable store): files mode archives "
                     "it whole as %s", name, flash_file(name, len(flashes)))
        if mount and guestfs:
            handle.view.disks[:], handle.appliance = guestfs_route.route(
                handle.view.disks, images, root, workdir, keys=luks_keys, skip=skip,
                recorder=recorder)
    except BaseException:
        unexpose(handle)
        raise
    return handle


def add_file(exposure: Exposure, name: str, content: bytes,
             recorder: Recorder | None = None) -> None:
    """Put a small file beside the exposed disks, in the mount root and the images dir."""
    for path in (exposure.root / name, exposure.images_dir / name):
        (recorder or _Nowhere()).append("files", str(path))
        dirs.create_file(path, content)
    exposure.extra_files.append(name)


def flash_file(name: str, flashes: int) -> str:
    """The files-mode name of a firmware flash: ``uefi-vars.fd`` for a VM's one writable
    flash (OVMF's variable store beside its read-only code), else one per flash."""
    return "uefi-vars.fd" if flashes == 1 else f"uefi-{safe_name(name)}.fd"


def _flash_bytes(name: str, export: Path) -> bytes:
    """The flash's content, read from its raw view; a flash is small (x86 maps at most
    64 MiB of them), anything larger is no firmware store."""
    if export.stat().st_size > MAX_FLASH_BYTES:
        raise HostError(f"disk {name} is attached as firmware flash but is larger than "
                        f"{MAX_FLASH_BYTES >> 20} MiB", "attach only firmware images as pflash")
    return export.read_bytes()


def unexpose(handle: Exposed) -> None:
    """Unmount, detach the loop devices, stop the export daemon, remove the raw views."""
    view = handle.view
    for name in view.extra_files:
        (view.root / name).unlink(missing_ok=True)
        (view.images_dir / name).unlink(missing_ok=True)
    guestfs_route.close(handle.appliance)
    handle.appliance = None
    for mountpoint in reversed(handle.mounts):
        mounts.unmount(mountpoint)
    for loop in reversed(handle.loops):
        mounts.detach_loop(loop)
    if handle.daemon is not None:
        # SIGTERM makes qemu-storage-daemon unmount its FUSE exports and exit cleanly.
        process.stop(handle.daemon, grace=10)
    for export in handle.exports:
        if mounts.is_mountpoint(export):
            process.run(["umount", "-l", export], timeout=30, check=False)
        export.unlink(missing_ok=True)
    handle.sockets.close()
    handle.mounts, handle.loops, handle.exports, handle.daemon = [], [], [], None


def read_ahead(loop: Path) -> None:
    """4 MiB of read-ahead instead of 128 KiB: each read of the loop device is a round trip
    through FUSE to qemu-storage-daemon (borg's image backup of a 2 GiB disk: 4.1 s instead
    of 4.8 s; from a raw file 3.6 s). Only speed depends on it: a failure is let be.

    With ``direct_io`` the loop device also skips the FUSE file's page cache, which passed
    its reads on 128 KiB at a time: the whole disk read at 1.7-2.1 GiB/s instead of
    270-1040 MiB/s, borg's image archive step 1.4-1.8x faster (measured side by side, issue
    #15). Files mode reads many small blocks that page cache groups: its archives were ~10%
    slower with direct I/O, so only jobs whose image archives read the loop devices (borg's)
    ask for it."""
    process.run(["blockdev", "--setra", str(READ_AHEAD_SECTORS), loop], timeout=30,
                check=False)


def _filesystem(handle: Exposed, name: str, partition: str, device: Path, mount: bool,
                record: Recorder, skip: Sequence[SkipRule]) -> ExposedFilesystem:
    """Classify the partition, and mount it read-only when files mode is to archive it; a
    mount the host refuses (no vfat in its kernel) is reported, not a failed backup."""
    probed = verify.probe(device)
    fs = ExposedFilesystem(name, partition, device, probed.type, None,
                           classify.kind_of(probed), probed=probed)
    outcome, reason = classify.plan_files(fs, skip, mounts.MOUNT_OPTIONS)
    if not (mount and outcome is Outcome.ARCHIVED):
        return replace(fs, outcome=outcome, reason=reason)
    top = handle.view.root / safe_name(name)
    mountpoint = top / partition if partition else top
    dirs.private_dir(mountpoint, "a mount point")
    record.append("mounts", str(mountpoint))
    try:
        mounts.mount_read_only(device, mountpoint, fs.fstype)
    except KvmsnapError as exc:
        mountpoint.rmdir()
        return replace(fs, outcome=Outcome.NOT_ARCHIVED,
                       reason=f"mount failed ({exc.one_line()})")
    handle.mounts.append(mountpoint)
    return replace(fs, mountpoint=mountpoint, outcome=outcome, reason=reason)


def _start_exports(handle: Exposed, images: Sequence[Image], timeout: float,
                   record: Recorder) -> None:
    images_dir = dirs.private_dir(handle.view.images_dir, "the images directory")
    nbd_socket = handle.sockets.enter_context(socket_dir()) / "nbd.sock"
    record.append("files", str(nbd_socket))
    argv = [process.find_program("qemu-storage-daemon", "qemu-system-common"),
            "--nbd-server", f"addr.type=unix,addr.path={escape(nbd_socket)}"]
    for index, (name, image, image_format) in enumerate(images):
        export = images_dir / f"{safe_name(name)}.raw"
        dirs.create_file(export)  # the FUSE export's mount point
        handle.exports.append(export)
        argv += ["--blockdev", f"driver={_protocol(image)},node-name=f{index},"
                               f"filename={escape(image)},read-only=on",
                 "--blockdev", f"driver={_driver(image_format)},node-name=d{index},"
                               f"file=f{index},read-only=on",
                 "--export", f"type=fuse,id=e{index},node-name=d{index},"
                             f"mountpoint={escape(export)},writable=off",
                 "--export", f"type=nbd,id=n{index},node-name=d{index},name=d{index},"
                             "writable=off"]
        handle.nbd_uris.append(nbd_uri(nbd_socket, f"d{index}"))
    stderr_path = images_dir.parent / "qsd.stderr"
    record.record(exports=[str(e) for e in handle.exports])
    dirs.create_file(stderr_path)
    with open(stderr_path, "wb") as err:
        handle.daemon = process.spawn(argv, stderr=err)
    record.record(qsd=process.identity(handle.daemon.pid))
    _wait_mounted(handle.exports, handle.daemon, stderr_path, timeout)


def nbd_uri(socket: Path, export: str) -> str:
    """``nbd+unix:///EXPORT?socket=PATH``, the path quoted as the NBD URI spec wants."""
    return f"nbd+unix:///{export}?socket={urllib.parse.quote(str(socket), safe='/')}"


def _driver(image_format: str) -> str:
    """The block driver for a format QEMU reported, as it is: never probed from the bytes."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", image_format or ""):
        raise HostError(f"cannot expose a disk image of format {image_format!r}",
                        "back the VM up with disks in qcow2 or raw format")
    return image_format


def _protocol(image: Path) -> str:
    """QEMU's ``file`` driver opens regular files only; a host block device (an offline
    VM's LVM volume, say) needs ``host_device``."""
    return "host_device" if stat.S_ISBLK(image.stat().st_mode) else "file"


def _wait_mounted(exports: list[Path], daemon, stderr_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(mounts.is_mountpoint(e) for e in exports):
        if daemon.poll() is not None:
            message = stderr_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise HostError(f"qemu-storage-daemon could not export the disks: "
                            f"{message[0] if message else daemon.returncode}",
                            "check /dev/fuse (modprobe fuse) and that kvmsnap runs as root")
        if time.monotonic() > deadline:
            raise HostError(f"the FUSE exports did not appear within {timeout:g} s")
        time.sleep(0.02)
