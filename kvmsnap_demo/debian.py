"""A real Debian bookworm test guest: built with debootstrap, cached, and launched.

The busybox demo guest proves the mechanics; this guest proves them on what users run:
systemd, udev, systemd-logind handling the ACPI power button, an ext4 root and an xfs data
volume on a GPT disk. Its workload (``debian-workload.sh``) appends numbered lines to both
filesystems without fsync; with ``commit=600`` and periodic writeback switched off those
lines stay in the page cache, so a crash-consistent copy visibly lacks them and needs
journal/log recovery, while a clean shutdown through the power button writes them out and
leaves a ``clean-shutdown`` marker.

The image is built without the nbd module (a raw file on a loop device with partitions),
converted to qcow2 and cached under ``~/.cache/kvmsnap/debian-KEY/``, keyed by a hash of
everything that goes into it, so a second :func:`build_debian_guest` returns at once.
The build happens in a temporary directory renamed into place at the end; loop devices
and mounts are released on every path out, also on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from kvmsnap_demo.disk import WorkloadLines
from kvmsnap_demo.vm import DemoPaths
from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.errors import HostError, ProcessError, VMError
from kvmsnap_plugin.host import images, process
from kvmsnap_plugin.host.probes import QEMU
from kvmsnap_plugin.model import FsState
from kvmsnap_plugin.paths import cache_root, socket_dir
from kvmsnap_plugin.vm.machine import Machine

log = logging.getLogger(__name__)

#: Bump when the build procedure changes in a way the hashed inputs do not show.
RECIPE_VERSION = 2
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "initramfs-tools", "dbus",
            "xfsprogs", "e2fsprogs")
#: Installed after the configuration is written, so its initramfs is built only once.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
DISK_MIB = 2048
HOSTNAME = "kvmsnap-debian"
WORKLOAD_ASSET = "debian-workload.sh"
WORKLOAD_LOG = "workload.log"
MARKER = "clean-shutdown"
ROOT_WORKLOAD_DIR = "/var/lib/kvmsnap-workload"

#: fsck.mode=skip and rw: no fsck pass and no remount under slow TCG; panic=-1 with
#: QEMU's -no-reboot turns a kernel panic into a quick QEMU exit instead of a hang.
#: systemd.status_unit_format=name keeps status lines short and greppable
#: ("Stopped kvmsnap-workload.service.") instead of ellipsized descriptions.
APPEND = ("root=/dev/vda1 rootfstype=ext4 rw rootflags=commit=600 console=ttyS0 "
          "systemd.show_status=1 systemd.status_unit_format=name fsck.mode=skip panic=-1")

READY = r"KVMSNAP-READY"
BUTTON_WATCHED = r"systemd-logind\[\d+\]: Watching system buttons on \S+ \(Power Button\)"
STOPPED = r"KVMSNAP-WORKLOAD-STOPPED (\d+)"
POWERED_DOWN = r"reboot: Power down"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

#: Units that only cost boot time under TCG, write to the disk behind the workload's back,
#: or would wait for things this guest does not have. No getty: nobody logs in.
MASKED_UNITS = (
    "serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "xfs_scrub_all.timer",
    "systemd-tmpfiles-clean.timer", "systemd-networkd-wait-online.service",
    "systemd-hwdb-update.service", "ldconfig.service", "systemd-update-done.service",
)


@dataclass(frozen=True)
class Partition:
    """One partition of the guest disk, as the guest sees it."""

    number: int
    name: str  # the GPT partition name
    fstype: str
    mountpoint: str
    size_mib: int  # 0: the rest of the disk
    label: str
    uuid: str = ""  # the filesystem UUID, known once built

    @property
    def guest_device(self) -> str:
        return f"/dev/vda{self.number}"


LAYOUT = (
    Partition(1, "root", "ext4", "/", 1536, "kvmsnap-root"),
    Partition(2, "data", "xfs", "/data", 0, "kvmsnap-data"),
)

#: Static files written into the guest (path relative to its root -> content).
GUEST_FILES: dict[str, str] = {
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    # The cloud kernel has its virtio drivers as modules: the initramfs must carry them.
    "etc/initramfs-tools/modules": "# kvmsnap: the root disk is virtio-blk\n"
                                   "virtio_pci\nvirtio_blk\next4\n",
    "etc/initramfs-tools/conf.d/kvmsnap": "RESUME=none\nCOMPRESS=gzip\n",
    # Buffered writes stay in the page cache until a sync or an unmount. xfs forces its
    # log every second instead of every 30: its metadata changes reach the on-disk log at
    # once, so a crash-consistent copy shows a dirty log, not an idle one that looks clean.
    "etc/sysctl.d/90-kvmsnap.conf": "vm.dirty_writeback_centisecs = 0\n"
                                    "vm.dirty_expire_centisecs = 360000\n"
                                    "fs.xfs.xfssyncd_centisecs = 100\n",
    # button: the ACPI "Power Button" input device; evdev: its /dev/input/event node,
    # through which systemd-logind sees it; xfs: loaded before systemd-sysctl runs, so
    # its fs.xfs.* setting exists by then.
    "etc/modules-load.d/kvmsnap.conf": "button\nevdev\nxfs\n",
    # Nothing to gain from these under TCG, only boot time.
    "etc/modprobe.d/kvmsnap-blacklist.conf": "blacklist kvm_amd\nblacklist kvm_intel\n"
                                             "blacklist powernow_k8\n",
    # logind's own messages ("Watching system buttons", "Power key pressed") on the
    # console, so the host sees who handled the button.
    "etc/systemd/system/systemd-logind.service.d/kvmsnap-console.conf":
        "[Service]\nEnvironment=SYSTEMD_LOG_TARGET=console\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n",
    "etc/systemd/journald.conf.d/kvmsnap.conf": "[Journal]\nStorage=volatile\n",
    "etc/systemd/system.conf.d/kvmsnap.conf": "[Manager]\nDefaultTimeoutStopSec=20s\n",
    "etc/systemd/system/kvmsnap-workload.service": """\
[Unit]
Description=kvmsnap test workload
RequiresMountsFor=/var/lib /data
# READY must mean the power button works: logind watches the buttons before it is started.
After=systemd-logind.service

[Service]
Type=exec
ExecStart=/usr/local/sbin/kvmsnap-workload
TimeoutStopSec=20s

[Install]
WantedBy=multi-user.target
""",
}


@dataclass(frozen=True)
class DebianGuest:
    """A built, cached Debian guest. Nothing here may be written: overlay the image."""

    base_image: Path  # qcow2, read-only
    kernel: Path
    initrd: Path
    append: str  # the kernel command line
    partitions: tuple[Partition, ...]
    kernel_version: str
    key: str  # the cache key: hash of the recipe

    def partition(self, name: str) -> Partition:
        return next(p for p in self.partitions if p.name == name)


# -- the public entry points -----------------------------------------------------------------
def build_debian_guest(cache: Path | None = None) -> DebianGuest:
    """Return the cached Debian guest, building it first if missing (about a minute).

    Safe to call from parallel test sessions: they wait for one another's build.
    """
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    key = cache_key(mirror)
    final = cache / f"debian-{key}"
    with _build_lock(cache):
        if not (final / "build-info.json").exists():
            _build_into(final, cache, mirror, key)
    return load_guest(final)


def cached_debian_guest(cache: Path | None = None) -> DebianGuest | None:
    """The Debian guest for the current recipe if already built (no apt, no network)."""
    cache = cache or cache_root()
    try:
        final = cache / f"debian-{cache_key(apt_mirror())}"
    except HostError:
        return None
    return load_guest(final) if (final / "build-info.json").exists() else None


def load_guest(directory: Path) -> DebianGuest:
    info = json.loads((directory / "build-info.json").read_text())
    return DebianGuest(
        base_image=directory / "base.qcow2", kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img", append=APPEND,
        partitions=tuple(Partition(**p) for p in info["partitions"]),
        kernel_version=info["kernel_version"], key=info["key"])


def cache_key(mirror: str) -> str:
    """Hash of every input of the build, so a changed recipe gets a fresh image."""
    recipe = {
        "version": RECIPE_VERSION, "suite": SUITE, "mirror": mirror,
        "packages": PACKAGES, "kernel": KERNEL_PACKAGE, "disk_mib": DISK_MIB,
        "layout": [asdict(p) for p in LAYOUT], "files": GUEST_FILES,
        "masked": MASKED_UNITS, "workload": _workload_script().decode(),
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror URI for bookworm main (deb822 first, then one-line lists)."""
    for sources in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = _deb822_fields(stanza)
            if ("deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()):
                return fields["uris"].split()[0]
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in (p for p in lists if p.exists()):
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#")[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words:
                return words[1]
    raise HostError(f"no apt source for Debian {SUITE} main",
                    "add one to /etc/apt/sources.list.d/debian.sources "
                    "(URIs: http://deb.debian.org/debian)")


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def _workload_script() -> bytes:
    return resources.files("kvmsnap_demo").joinpath(WORKLOAD_ASSET).read_bytes()


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """One build at a time per cache (parallel test sessions share it)."""
    with open(cache / ".debian-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- the build -------------------------------------------------------------------------------
def _build_into(final: Path, cache: Path, mirror: str, key: str) -> None:
    """Build in a temporary directory next to ``final``, then rename it into place."""
    ensure_debootstrap()
    _require_programs()
    log.info("building the Debian %s test guest %s (takes minutes)", SUITE, key)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".debian-{key}-", dir=cache))
    try:
        info = _build_image(staging, cache / "debian-debs", mirror, key)
        info["build_seconds"] = round(time.monotonic() - started, 1)
        (staging / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp made it 0700; a QEMU run as another user reads it
        staging.rename(final)
    finally:
        _remove_build_dir(staging)
    log.info("built %s in %.0f s", final, time.monotonic() - started)


def _remove_build_dir(path: Path) -> None:
    """Delete a staging dir, but never through a mount point (it could be the host's /dev)."""
    if not path.exists():
        return
    left = mounts_under(path)
    if left:
        raise HostError(f"still mounted under {path}: {', '.join(left)}",
                        f"unmount them by hand, then remove {path}")
    shutil.rmtree(path, ignore_errors=True)


def _require_programs() -> None:
    for program, package in (("sfdisk", "fdisk"), ("mkfs.xfs", "xfsprogs"),
                             ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils"),
                             ("losetup", "mount")):
        process.find_program(program, package)


def ensure_debootstrap() -> None:
    """debootstrap is a Debian package the builder installs itself when missing."""
    try:
        process.find_program("debootstrap")
        return
    except HostError:
        log.info("installing debootstrap")
    install = ["apt-get", "install", "-y", "-q", "debootstrap"]
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        process.run(install, timeout=600, env=env)
    except ProcessError:  # a fresh machine may have no package lists yet
        process.run(["apt-get", "update", "-q"], timeout=600, env=env)
        process.run(install, timeout=600, env=env)


def _build_image(staging: Path, debs: Path, mirror: str, key: str) -> dict[str, object]:
    """Everything between an empty directory and base.qcow2 + kernel + initrd in it."""
    debs.mkdir(parents=True, exist_ok=True)
    raw = staging / "disk.raw"
    _partition(raw)
    with loop_device(raw) as loop:
        partitions = _make_filesystems(loop)
        root = staging / "root"
        with mounted(loop.partition(1), root, "ext4"):
            _debootstrap(root, debs, mirror)
            _configure(root, partitions, key)
            with chroot_mounts(root, debs):
                _chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               KERNEL_PACKAGE], timeout=1200)
            version = _export_kernel(root, staging)
            _tidy(root)
            _trim(root)
        root.rmdir()
    process.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw,
                 staging / "base.qcow2"], timeout=900)
    raw.unlink()
    (staging / "base.qcow2").chmod(0o444)
    return {"key": key, "suite": SUITE, "mirror": mirror, "kernel_version": version,
            "packages": [*PACKAGES, KERNEL_PACKAGE],
            "partitions": [asdict(p) for p in partitions]}


def _partition(raw: Path) -> None:
    with open(raw, "wb") as handle:
        handle.truncate(DISK_MIB << 20)
    lines = ["label: gpt"]
    for part in LAYOUT:
        size = f"size={part.size_mib}MiB, " if part.size_mib else ""
        lines.append(f"{size}type=linux, name={part.name}")
    process.run(["sfdisk", "--quiet", raw], timeout=60, input="\n".join(lines).encode())


def _make_filesystems(loop: LoopDevice) -> tuple[Partition, ...]:
    """mkfs every partition; the ext4 is fully initialised now, not lazily in the guest."""
    made = []
    for part in LAYOUT:
        device = loop.partition(part.number)
        if part.fstype == "ext4":
            process.run(["mkfs.ext4", "-q", "-F", "-L", part.label, "-E",
                         "lazy_itable_init=0,lazy_journal_init=0", device], timeout=300)
        else:
            process.run(["mkfs.xfs", "-q", "-f", "-L", part.label, device], timeout=300)
        uuid = process.run(["blkid", "-p", "-o", "value", "-s", "UUID", device],
                           timeout=30).stdout.strip()
        made.append(Partition(**{**asdict(part), "uuid": uuid}))
    return tuple(made)


def _debootstrap(root: Path, debs: Path, mirror: str) -> None:
    log.info("debootstrap %s from %s", SUITE, mirror)
    try:
        process.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                     "--components=main", f"--cache-dir={debs}", SUITE, root, mirror],
                    timeout=1800)
    finally:
        # debootstrap mounts /proc and /sys in the target; never leave them behind.
        unmount_all_under(root, keep_top=True)


def _configure(root: Path, partitions: Sequence[Partition], key: str) -> None:
    """Write the guest's configuration before the kernel (and its initramfs) goes in."""
    for relative, content in GUEST_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (root / "etc/fstab").write_text(fstab(partitions))
    (root / "etc/machine-id").write_text(hashlib.sha256(key.encode()).hexdigest()[:32] + "\n")
    workload = root / "usr/local/sbin/kvmsnap-workload"
    workload.write_bytes(_workload_script())
    workload.chmod(0o755)
    for part in partitions:
        (root / part.mountpoint.lstrip("/")).mkdir(parents=True, exist_ok=True)
    # No daemons may start inside the chroot while packages are installed.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    if Path("/etc/resolv.conf").exists():  # apt inside the chroot downloads the kernel
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    _chroot(root, ["systemctl", "set-default", "multi-user.target"], timeout=60)
    _chroot(root, ["systemctl", "enable", "kvmsnap-workload.service"], timeout=60)
    _chroot(root, ["systemctl", "mask", *MASKED_UNITS], timeout=60)


def fstab(partitions: Sequence[Partition]) -> str:
    """By UUID; fsck pass 0 (the guest boots with fsck.mode=skip anyway)."""
    lines = ["# kvmsnap Debian test guest"]
    for part in partitions:
        options = "defaults,commit=600" if part.fstype == "ext4" else "defaults"
        lines.append(f"UUID={part.uuid} {part.mountpoint} {part.fstype} {options} 0 0")
    return "\n".join(lines) + "\n"


def _export_kernel(root: Path, staging: Path) -> str:
    """Copy the kernel and the initramfs initramfs-tools built inside the guest."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise HostError(f"{KERNEL_PACKAGE} installed no kernel into the guest",
                        "check the apt output of the build")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.exists():
        raise HostError(f"no initramfs was built for {version}",
                        "check that initramfs-tools is in PACKAGES")
    shutil.copy(kernels[-1], staging / "vmlinuz")
    shutil.copy(initrd, staging / "initrd.img")
    return version


def _tidy(root: Path) -> None:
    """Drop build-time leftovers: package caches, the policy, the host's resolv.conf."""
    _chroot(root, ["apt-get", "clean"], timeout=120)
    for leftover in ("usr/sbin/policy-rc.d", "etc/resolv.conf"):
        (root / leftover).unlink(missing_ok=True)
    lists = root / "var/lib/apt/lists"
    for item in lists.glob("*"):
        if item.is_file():
            item.unlink()


def _trim(root: Path) -> None:
    """Give freed blocks (debootstrap's .debs, apt lists) back to the sparse raw file.

    Blocks freed by a transaction that is not committed yet cannot be trimmed: sync first.
    The loop device turns the discards into holes, which qemu-img convert skips.
    """
    process.run(["sync", "--file-system", root], timeout=300)
    process.run(["fstrim", root], timeout=300)


def _chroot(root: Path, argv: Sequence[str], *, timeout: float) -> process.Result:
    return process.run(["chroot", root, *argv], timeout=timeout,
                       env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
                            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


# -- loop devices and mounts ---------------------------------------------------------------
@dataclass(frozen=True)
class LoopDevice:
    device: str  # /dev/loopN

    def partition(self, number: int) -> str:
        return f"{self.device}p{number}"


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = False, partitions: int = len(LAYOUT),
                timeout: float = 10.0) -> Iterator[LoopDevice]:
    """Attach a raw disk image with its ``partitions`` partitions; always detach it."""
    argv = ["losetup", "--find", "--show", "--partscan", *(["--read-only"] if read_only else []),
            image]
    loop = LoopDevice(process.run(argv, timeout=60).stdout.strip())
    try:
        _wait_for_partitions(loop, partitions, timeout)
        yield loop
    finally:
        process.run(["losetup", "--detach", loop.device], timeout=60, check=False)


def _wait_for_partitions(loop: LoopDevice, count: int, timeout: float) -> None:
    """Wait for the partition nodes; ask for them with ``partx --add`` if the scan is late.

    On some kernels (this project's 6.18 sandbox host) ``losetup --partscan`` attaches the
    device but never scans it; partx adds the partitions through BLKPG instead, and
    detaching the loop device still removes them.
    """
    expected = [Path(loop.partition(number)) for number in range(1, count + 1)]
    started = time.monotonic()
    asked = False
    while not all(path.exists() for path in expected):
        waited = time.monotonic() - started
        if not asked and waited > 1.0:
            process.run(["partx", "--add", loop.device], timeout=30, check=False)
            asked = True
        if waited > timeout:
            raise HostError(f"{loop.device}: partitions did not appear in {timeout:g} s",
                            "is this a GPT disk image? (losetup -P, /dev must be devtmpfs)")
        time.sleep(0.05)


@contextlib.contextmanager
def mounted(device: str | Path, mountpoint: Path, fstype: str,
            options: str = "defaults") -> Iterator[Path]:
    """Mount for the duration of the block; unmount (lazily as a last resort) after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    process.run(["mount", "-t", fstype, "-o", options, device, mountpoint], timeout=120)
    try:
        yield mountpoint
    finally:
        unmount_all_under(mountpoint)


@contextlib.contextmanager
def chroot_mounts(root: Path, debs: Path) -> Iterator[None]:
    """/proc, /sys, /dev for package scripts, and the shared .deb cache for apt."""
    archives = root / "var/cache/apt/archives"
    specs = [(["-t", "proc", "proc"], root / "proc"), (["-t", "sysfs", "sysfs"], root / "sys"),
             (["--bind", "/dev"], root / "dev"), (["--bind", str(debs)], archives)]
    try:
        for args, target in specs:
            target.mkdir(parents=True, exist_ok=True)
            process.run(["mount", *args, target], timeout=60)
        yield
    finally:
        unmount_all_under(root, keep_top=True)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mounts)."""
    top = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == top or target.startswith(top + "/"):
            found.append(target)
    return sorted(found, key=len, reverse=True)


def unmount_all_under(path: Path, *, keep_top: bool = False) -> None:
    """Unmount everything at/below ``path``; lazily if a plain unmount fails."""
    top = str(path.resolve())
    for target in mounts_under(path):
        if keep_top and target == top:
            continue
        result = process.run(["umount", target], timeout=120, check=False)
        if result.returncode != 0:
            log.warning("umount %s failed (%s); detaching lazily", target,
                        result.stderr.strip())
            process.run(["umount", "--lazy", target], timeout=60, check=False)


# -- reading a guest disk without booting it -----------------------------------------------------
@dataclass(frozen=True)
class GuestFilesystem(WorkloadLines):
    """What one filesystem of a guest disk holds, read without a read-write mount."""

    name: str  # "root" or "data"
    fstype: str
    state: FsState
    detail: str
    lines: tuple[str, ...]  # the workload log
    marker: str | None  # the clean-shutdown marker, if any


def read_guest_disk(image: Path, scratch: Path) -> dict[str, GuestFilesystem]:
    """Verdict and workload files of each filesystem of a guest disk (qcow2 or raw).

    A qcow2 is first copied to a raw file in ``scratch`` (``-U``: a VM may hold it), which
    is attached read-only. ext4 is read with debugfs, never mounted; xfs is mounted
    ``ro,norecovery``, which shows what is on disk without replaying the log.

    An xfs log only turns dirty once the kernel forces it to disk (every
    ``fs.xfs.xfssyncd_centisecs``; 1 s in this guest, 30 s by default): before that a
    crash copy has a clean-looking log and simply lacks the changes. A clean verdict is
    therefore necessary, not sufficient; the ``clean-shutdown`` marker is the proof.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    raw = image if image.suffix == ".raw" else images.raw_copy(image, scratch / "disk.raw")
    try:
        with loop_device(raw, read_only=True) as loop:
            return {part.name: _read_filesystem(loop.partition(part.number), part, scratch)
                    for part in LAYOUT}
    finally:
        if raw != image:
            raw.unlink(missing_ok=True)


def _read_filesystem(device: str, part: Partition, scratch: Path) -> GuestFilesystem:
    if part.fstype == "ext4":
        state, detail = verify.ext4_state(device)
        log_text = verify.read_file(device, f"{ROOT_WORKLOAD_DIR}/{WORKLOAD_LOG}") or b""
        marker = verify.read_file(device, f"{ROOT_WORKLOAD_DIR}/{MARKER}")
    else:
        state, detail = verify.xfs_state(device)
        with mounted(device, scratch / f"mnt-{part.name}", part.fstype,
                     "ro,norecovery") as mnt:
            log_text = _read_if_readable(mnt / WORKLOAD_LOG) or b""
            marker = _read_if_readable(mnt / MARKER)
    return GuestFilesystem(part.name, part.fstype, state, detail,
                           tuple(log_text.decode().splitlines()),
                           marker.decode().strip() if marker is not None else None)


def _read_if_readable(path: Path) -> bytes | None:
    """A file's bytes; None if absent or unreadable (an unreplayed log can leave a directory
    entry pointing at a free inode: that is what a crash copy looks like, not an error)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.info("%s is unreadable on this copy: %s", path.name, exc.strerror)
        return None


# -- launching ------------------------------------------------------------------------------------
def debian_argv(guest: DebianGuest, accel: str, paths: DemoPaths, *, memory_mib: int = 1024,
                smp: int = 1, nic: bool = True, extra_args: Sequence[str] = ()) -> list[str]:
    """The QEMU command line, shaped like the demo guest's (and libvirt's) for kvmsnap."""
    argv = [
        process.find_program(QEMU, "qemu-system-x86"),
        "-name", "kvmsnap-debian",
        "-machine", f"pc,accel={accel}",
        "-m", str(memory_mib), "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append,
        "-chardev", f"file,id=console0,path={paths.console}", "-serial", "chardev:console0",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.backup_qmp},server=on,wait=off",
    ]
    for index, disk in enumerate(paths.disks):
        argv += ["-blockdev", f"driver=file,filename={disk},node-name=disk{index}-file",
                 "-blockdev", f"driver=qcow2,file=disk{index}-file,node-name=disk{index}",
                 "-device", f"virtio-blk-pci,drive=disk{index},id=vdisk{index}"]
    if nic:
        argv += ["-netdev", "user,id=net0,restrict=on",
                 "-device", "virtio-net-pci,netdev=net0,id=nic0"]
    return argv + list(extra_args)


class DebianVM(Machine):
    """A running Debian guest, with helpers to follow its workload and shut it down."""

    def __init__(self, argv: list[str], paths: DemoPaths, guest: DebianGuest) -> None:
        super().__init__(argv, qmp_path=paths.qmp, name="debian", console_log=paths.console)
        self.paths = paths
        self.guest = guest

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait for the workload, and for logind to watch the power button.

        systemd under TCG boots in about 20 s; a button press before logind watches the
        button would be lost silently.
        """
        started = time.monotonic()
        self.wait_console(READY, timeout)
        self.wait_console(BUTTON_WATCHED, max(5.0, timeout - (time.monotonic() - started)))

    def plain_console(self) -> str:
        """The console log without systemd's colour escapes, for matching status lines."""
        return ANSI_ESCAPE.sub("", self.console())

    def counter(self) -> int:
        """The workload's latest line number, as echoed on the console."""
        counts = re.findall(r"KVMSNAP-COUNT (\d+)", self.console())
        return int(counts[-1]) if counts else 0

    def wait_counter(self, at_least: int, timeout: float = 60.0) -> int:
        self.wait_console(rf"KVMSNAP-COUNT {at_least}\b", timeout)
        return self.counter()

    def crash_copy(self, index: int, dest: Path) -> Path:
        """A raw copy of disk ``index`` as a power cut would leave it (guest paused meanwhile)."""
        self.qmp.execute("stop")
        try:
            return images.raw_copy(self.paths.disks[index], dest)
        finally:
            self.qmp.execute("cont")

    def stopped_at(self) -> int | None:
        """The last line the workload wrote before systemd stopped it (None: not stopped)."""
        match = re.search(STOPPED, self.console())
        return int(match.group(1)) if match else None

    def power_off_cleanly(self, timeout: float = 120.0) -> float:
        """Press the power button; wait for QEMU to exit after a full poweroff. Seconds taken."""
        started = time.monotonic()
        self.qmp.execute("system_powerdown")
        if not self.wait_exit(timeout):
            raise VMError(f"the Debian guest did not power off within {timeout:g} s",
                          f"see the guest console: {self.paths.console}")
        taken = time.monotonic() - started
        self.ended_by = "guest"
        self.shutdown()
        if not re.search(POWERED_DOWN, self.console()):
            raise VMError("QEMU exited without the guest powering off",
                          f"see the guest console: {self.paths.console}")
        return taken

    def shutdown(self, powerdown_timeout: float = 90.0, quit_timeout: float = 5.0) -> str:
        """Like Machine.shutdown, with room for systemd to stop everything under TCG."""
        return super().shutdown(powerdown_timeout, quit_timeout)


@contextlib.contextmanager
def debian_vm(guest: DebianGuest, accel: str, workdir: Path, memory_mib: int = 1024, *,
              smp: int = 1, nic: bool = True, extra_args: Sequence[str] = (),
              disk: Path | None = None) -> Iterator[DebianVM]:
    """Start the guest on a fresh qcow2 overlay in ``workdir``; always stop QEMU after.

    The overlay and the console log stay in ``workdir`` (the caller's) for inspection.
    ``disk`` boots an existing disk image instead (e.g. one ``kvmsnap restore`` made).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = disk or make_overlay(guest.base_image, workdir / "disk0.qcow2")
    with socket_dir() as sockets:
        paths = DemoPaths(workdir, (overlay,), sockets / "qmp.sock",
                          sockets / "backup-qmp.sock", workdir / "console.log")
        argv = debian_argv(guest, accel, paths, memory_mib=memory_mib, smp=smp, nic=nic,
                           extra_args=extra_args)
        with DebianVM(argv, paths, guest) as vm:
            yield vm


def make_overlay(base: Path, overlay: Path) -> Path:
    """A qcow2 overlay, so the shared base image is never written."""
    try:
        process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                     overlay], timeout=60)
    except ProcessError as exc:
        raise HostError(f"cannot create an overlay on {base}: {exc}",
                        "rebuild the guest: remove its ~/.cache/kvmsnap/debian-* dir") from exc
    return overlay
