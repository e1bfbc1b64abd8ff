"""Build the demo/test guest from Debian packages and cache it.

The guest is the Debian cloud kernel (``apt-get download``, unpacked with ``dpkg-deb``) plus
a busybox-static initramfs whose init (``init.sh``) runs a workload and handles the ACPI
power button. Data disks are qcow2 images holding an empty ext4.

Everything lands under ``$XDG_CACHE_HOME/kvmsnap`` (``~/.cache/kvmsnap``) keyed by the
kernel version and a hash of what goes into the initramfs, so a second build is free.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.paths import cache_root

log = logging.getLogger(__name__)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_blk", "button", "evdev", "failover", "net_failover", "virtio_net", "virtio_console",
)
BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


@dataclass(frozen=True)
class DemoGuest:
    """A bootable demo guest: kernel and initramfs, both read-only and shared."""

    kernel: Path
    initrd: Path
    kernel_version: str


def build_guest(cache: Path | None = None) -> DemoGuest:
    """Return the cached demo guest, building what is missing."""
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    guest = _expected_guest(cache, package.removeprefix("linux-image-"))
    kernel_dir = guest.kernel.parent
    if not all((kernel_dir / "modules" / f"{m}.ko").exists() for m in MODULES):
        fetch_kernel(package, guest.kernel_version, kernel_dir)
    if not guest.initrd.exists():
        log.info("building the demo initramfs (%s)", guest.initrd.name)
        write_atomically(guest.initrd, make_initramfs(
            _init_script(), find_busybox().read_bytes(), kernel_dir / "modules"))
    return guest


def _init_script() -> bytes:
    return resources.files("kvmsnap_demo").joinpath("init.sh").read_bytes()


def _expected_guest(cache: Path, version: str) -> DemoGuest:
    try:
        busybox = find_busybox().read_bytes()
    except HostError:
        busybox = b""
    key = hashlib.sha256(_init_script() + busybox + version.encode()).hexdigest()[:12]
    return DemoGuest(cache / f"kernel-{version}" / "vmlinuz", cache / f"initrd-{key}.gz",
                     version)


def kernel_package() -> str:
    """The versioned cloud kernel package the meta package points at."""
    result = process.run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60, check=False)
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", result.stdout)
    if not match:
        raise HostError(f"apt knows no {KERNEL_META_PACKAGE}",
                        "run `apt-get update` (Debian 12 main must be in sources.list)")
    return match.group(1)


def fetch_kernel(package: str, version: str, kernel_dir: Path) -> None:
    log.info("downloading the Debian cloud kernel %s", version)
    with tempfile.TemporaryDirectory(dir=kernel_dir.parent) as tmp:
        tmpdir = Path(tmp)
        # apt drops privileges to _apt for downloads: let it write here.
        tmpdir.chmod(0o777)
        process.run(["apt-get", "download", "-q", package], timeout=600, cwd=tmpdir)
        deb = next(tmpdir.glob("linux-image-*.deb"))
        tree = tmpdir / "tree"
        process.run(["dpkg-deb", "-x", deb, tree], timeout=300)
        # Add what is missing file by file (each written atomically): other runs may be
        # booting this kernel right now.
        (kernel_dir / "modules").mkdir(parents=True, exist_ok=True)
        for name in MODULES:
            target = kernel_dir / "modules" / f"{name}.ko"
            if not target.exists():
                source = find_module(tree / "lib" / "modules" / version, name)
                data = source.read_bytes()
                write_atomically(target, lzma.decompress(data) if source.suffix == ".xz"
                                 else data)
        if not (kernel_dir / "vmlinuz").exists():
            write_atomically(kernel_dir / "vmlinuz",
                             (tree / "boot" / f"vmlinuz-{version}").read_bytes())


def find_module(tree: Path, name: str) -> Path:
    for candidate in tree.rglob(f"{name}.ko*"):
        if candidate.name in (f"{name}.ko", f"{name}.ko.xz"):
            return candidate
    raise HostError(f"kernel module {name} is missing from the kernel package",
                    "report this: the Debian cloud kernel layout changed")


def find_busybox() -> Path:
    for path in BUSYBOX_PATHS:
        if path.exists():
            return path
    raise HostError("busybox is not installed", "apt-get install busybox-static")


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.rename(path)


# -- initramfs: a pure-Python cpio "newc" writer, so /dev/console needs no root ------------
def make_initramfs(init: bytes, busybox: bytes, modules: Path) -> bytes:
    archive = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "run", "mnt", "lib", "lib/modules"):
        archive.add(directory, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    for applet in ("sh", "mount", "insmod", "poweroff", "sleep", "cat", "echo"):
        archive.add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    archive.add("init", stat.S_IFREG | 0o755, init.replace(
        b"export PATH=/bin\n", b"export PATH=/bin\n/bin/busybox --install -s /bin\n", 1))
    for module in sorted(modules.glob("*.ko")):
        archive.add(f"lib/modules/{module.name}", stat.S_IFREG | 0o644, module.read_bytes())
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


class CpioWriter:
    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._out.write(encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self._out.getvalue()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


# -- data disks -------------------------------------------------------------------------------
def make_data_disk(path: Path, size_mib: int = 64, label: str = "data") -> Path:
    """A qcow2 image holding an empty ext4 filesystem."""
    raw = path.with_suffix(".raw")
    try:
        with open(raw, "wb") as handle:
            handle.truncate(size_mib << 20)
        process.run(["mkfs.ext4", "-q", "-F", "-L", label, "-E",
                     "lazy_itable_init=0,lazy_journal_init=0", raw], timeout=120)
        process.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], timeout=120)
    finally:
        raw.unlink(missing_ok=True)
    return path
