"""Expose the clone's disks read-only: raw image files, block devices, mounted filesystems.

No nbd module is needed: ``qemu-storage-daemon`` exports each qcow2 as a raw file through
FUSE (read-only), ``losetup -r -P`` turns that file into a block device with its partitions,
and each filesystem found is mounted read-only without journal replay (ext4 ``noload``, xfs
``norecovery``) under one mount root: ``ROOT/<disk>`` for a whole-disk filesystem,
``ROOT/<disk>/p<N>`` for partitions. :func:`unexpose` unmounts, detaches and stops the
daemon, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmsnap_plugin import process, verify
from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.journal import Journal
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.qemu_args import escape

log = logging.getLogger("kvmsnap")

MOUNT_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "ext2": "ro", "xfs": "ro,norecovery",
                 "vfat": "ro", "btrfs": "ro,nologreplay"}


@dataclass(frozen=True)
class ExposedFilesystem:
    disk: str
    partition: str  # "" for a whole-disk filesystem, else "p1", ...
    device: Path  # the read-only block device
    fstype: str
    mountpoint: Path | None  # None when the type cannot be mounted


@dataclass(frozen=True)
class ExposedDisk:
    name: str
    image: Path  # a raw, read-only view of the whole disk (a FUSE export)
    loop: Path
    filesystems: tuple[ExposedFilesystem, ...]


@dataclass
class Exposure:
    root: Path  # the mount root
    disks: list[ExposedDisk] = field(default_factory=list)
    #: small files beside the disks (in the mount root and beside the raw views), e.g. the
    #: VM's metadata: archivers include them
    extra_files: list[str] = field(default_factory=list)
    # what :func:`unexpose` must undo, in reverse
    _daemon: subprocess.Popen[bytes] | None = None
    _exports: list[Path] = field(default_factory=list)
    _loops: list[Path] = field(default_factory=list)
    _mounts: list[Path] = field(default_factory=list)

    @property
    def filesystems(self) -> list[ExposedFilesystem]:
        return [fs for disk in self.disks for fs in disk.filesystems]

    @property
    def images_dir(self) -> Path:
        """The directory of the raw views (an archiver's working directory for images)."""
        return self._exports[0].parent if self._exports else self.root


@contextlib.contextmanager
def exposed(images: Sequence[tuple[str, Path]], workdir: Path, root: Path, *,
            mount: bool = True, timeout: float = 60.0,
            journal: Journal | None = None) -> Iterator[Exposure]:
    """:func:`expose`, undone on exit."""
    exposure = expose(images, workdir, root, mount=mount, timeout=timeout, journal=journal)
    try:
        yield exposure
    finally:
        unexpose(exposure)


def expose(images: Sequence[tuple[str, Path]], workdir: Path, root: Path, *,
           mount: bool = True, timeout: float = 60.0,
           journal: Journal | None = None) -> Exposure:
    """Expose ``(name, qcow2-or-raw image)`` pairs: raw views in ``workdir/images``,
    filesystems under ``root``. Undo with :func:`unexpose` (done here on failure).

    With a journal, each export, loop device and mount is recorded before it is made, so
    :func:`kvmsnap_plugin.cleanup.recover` can undo them after a crash, and a split backup
    (``kvmsnap mount``) can leave them for ``kvmsnap release``.
    """
    record = journal or _NoJournal()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise HostError(f"the mount root {root} is not empty",
                        "an interrupted run? run `kvmsnap recover`, or pick another mount root")
    exposure = Exposure(root)
    try:
        _start_exports(exposure, images, workdir, timeout, record)
        for (name, _), export in zip(images, exposure._exports, strict=True):
            record.append("loop_files", str(export))
            loop = _attach_loop(export)
            record.append("loops", str(loop))
            exposure._loops.append(loop)
            filesystems = [_filesystem(exposure, name, partition, device, mount, record)
                           for partition, device in _block_devices(loop, timeout)]
            exposure.disks.append(ExposedDisk(name, export, loop, tuple(filesystems)))
    except BaseException:
        unexpose(exposure)
        raise
    return exposure


def add_file(exposure: Exposure, name: str, content: bytes,
             journal: Journal | None = None) -> None:
    """Put a small file beside the exposed disks, in the mount root and the images dir."""
    places = [exposure.root / name, exposure.images_dir / name]
    for path in places:
        if journal:
            journal.append("files", str(path))
        path.write_bytes(content)
        path.chmod(0o600)
    exposure.extra_files.append(name)


def unexpose(exposure: Exposure) -> None:
    """Unmount, detach the loop devices, stop the export daemon, remove the raw views."""
    for name in exposure.extra_files:
        (exposure.root / name).unlink(missing_ok=True)
        (exposure.images_dir / name).unlink(missing_ok=True)
    for mountpoint in reversed(exposure._mounts):
        unmount(mountpoint)
    for loop in reversed(exposure._loops):
        _detach_loop(loop)
    if exposure._daemon is not None:
        # SIGTERM makes qemu-storage-daemon unmount its FUSE exports and exit cleanly.
        process.stop(exposure._daemon, grace=10)
    for export in exposure._exports:
        if is_mountpoint(export):
            process.run(["umount", "-l", export], timeout=30, check=False)
        export.unlink(missing_ok=True)
    exposure._mounts, exposure._loops, exposure._exports = [], [], []
    exposure._daemon = None


def _filesystem(exposure: Exposure, name: str, partition: str, device: Path, mount: bool,
                record: Journal | _NoJournal) -> ExposedFilesystem:
    fstype = verify.probe_fstype(device)
    mountpoint = None
    if mount and fstype in MOUNT_OPTIONS:
        top = exposure.root / safe_name(name)
        mountpoint = top / partition if partition else top
        mountpoint.mkdir(parents=True, exist_ok=True)
        record.append("mounts", str(mountpoint))
        _mount(device, mountpoint, fstype)
        exposure._mounts.append(mountpoint)
    return ExposedFilesystem(name, partition, device, fstype, mountpoint)


def _start_exports(exposure: Exposure, images: Sequence[tuple[str, Path]], workdir: Path,
                   timeout: float, record: Journal | _NoJournal) -> None:
    argv = [process.find_program("qemu-storage-daemon", "qemu-system-common")]
    (workdir / "images").mkdir(mode=0o700, parents=True, exist_ok=True)
    for index, (name, image) in enumerate(images):
        export = workdir / "images" / f"{safe_name(name)}.raw"
        export.touch(mode=0o600)
        exposure._exports.append(export)
        fmt = _image_format(image)
        argv += ["--blockdev", f"driver=file,node-name=f{index},filename={escape(image)},"
                               "read-only=on",
                 "--blockdev", f"driver={fmt},node-name=d{index},file=f{index},read-only=on",
                 "--export", f"type=fuse,id=e{index},node-name=d{index},"
                             f"mountpoint={escape(export)},writable=off"]
    stderr_path = workdir / "qsd.stderr"
    record.record(exports=[str(e) for e in exposure._exports])
    with open(stderr_path, "wb") as err:
        exposure._daemon = process.spawn(argv, stderr=err)
    record.record(qsd=process.identity(exposure._daemon.pid))
    _wait_mounted(exposure._exports, exposure._daemon, stderr_path, timeout)


class _NoJournal:
    """Stands in for a journal when nothing needs to survive a crash."""

    def record(self, **fields: object) -> None:
        pass

    def append(self, key: str, value: object) -> None:
        pass


def _image_format(image: Path) -> str:
    with open(image, "rb") as handle:
        return "qcow2" if handle.read(4) == b"QFI\xfb" else "raw"


def _wait_mounted(exports: list[Path], daemon, stderr_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(is_mountpoint(e) for e in exports):
        if daemon.poll() is not None:
            message = stderr_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise HostError(f"qemu-storage-daemon could not export the disks: "
                            f"{message[0] if message else daemon.returncode}",
                            "check /dev/fuse (modprobe fuse) and that kvmsnap runs as root")
        if time.monotonic() > deadline:
            raise HostError(f"the FUSE exports did not appear within {timeout:g} s")
        time.sleep(0.02)


def is_mountpoint(path: Path) -> bool:
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def _attach_loop(image: Path) -> Path:
    out = process.run(["losetup", "--read-only", "--partscan", "--find", "--show", image],
                      timeout=60).stdout.strip()
    return Path(out)


def _detach_loop(loop: Path) -> None:
    process.run(["losetup", "-d", loop], timeout=60, check=False)


def detach_loops_of(backing: Path) -> None:
    """Detach every loop device backed by ``backing`` (recovery knows files, not devices)."""
    out = process.run(["losetup", "-j", backing], timeout=30, check=False).stdout
    for line in out.splitlines():
        _detach_loop(Path(line.split(":", 1)[0]))


def detach_orphaned_loop(loop: Path, backing: Path) -> None:
    """Detach ``loop`` if it still shows ``backing``, or a backing that vanished with its
    export daemon (the kernel then reports "/"): never someone else's loop device."""
    try:
        current = Path(f"/sys/block/{loop.name}/loop/backing_file").read_text().strip()
    except OSError:
        return  # not attached any more
    if current in (str(backing), "/"):
        _detach_loop(loop)


def _block_devices(loop: Path, timeout: float) -> list[tuple[str, Path]]:
    """The loop device's partitions ("p1", ...), or the whole device ("").

    On some kernels ``losetup --partscan`` attaches the device but never scans it; then
    ``partx --add`` creates the partition devices (detaching still removes them).
    """
    table = process.run(["partx", "--show", "--noheadings", "--output", "NR", loop],
                        timeout=30, check=False)
    numbers = [int(n) for n in table.stdout.split()] if table.returncode == 0 else []
    if not numbers:
        return [("", loop)]
    devices = [(f"p{n}", Path(f"{loop}p{n}")) for n in numbers]
    started = time.monotonic()
    asked = False
    while not all(device.exists() for _, device in devices):
        waited = time.monotonic() - started
        if not asked and waited > 0.2:
            process.run(["partx", "--add", loop], timeout=30, check=False)
            asked = True
        if waited > timeout:
            raise HostError(f"partitions of {loop} did not appear in {timeout:g} s",
                            "check that /dev is a devtmpfs and partx works")
        time.sleep(0.05)
    return devices


def _mount(device: Path, mountpoint: Path, fstype: str) -> None:
    process.run(["mount", "-t", fstype, "-o", MOUNT_OPTIONS[fstype], device, mountpoint],
                timeout=120)


def unmount(mountpoint: Path) -> None:
    """Unmount (lazily if busy) and remove the mount point; a no-op if not mounted."""
    if not is_mountpoint(mountpoint):
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        return
    try:
        process.run(["umount", mountpoint], timeout=120)
    except KvmsnapError:
        # Someone still reads it (an archiver that was killed?): detach lazily, never leave it.
        process.run(["umount", "-l", mountpoint], timeout=60, check=False)
    with contextlib.suppress(OSError):
        mountpoint.rmdir()
