"""Build the Debian test guest with debootstrap, and cache it.

The image is built without the nbd module (a raw file on a loop device with partitions),
converted to qcow2 and cached under ``~/.cache/kvmsnap/debian-KEY/``, keyed by a hash of
everything that goes into it (:mod:`kvmsnap_demo.debian.recipe`), so a second
:func:`build_debian_guest` returns at once. The build happens in a temporary directory
renamed into place at the end; loop devices and mounts are released on every path out,
also on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from kvmsnap_demo.cache import build_once
from kvmsnap_demo.debian.recipe import (
    DISK_MIB,
    GUEST_FILES,
    KERNEL_PACKAGE,
    LAYOUT,
    MASKED_UNITS,
    PACKAGES,
    SUITE,
    DebianGuest,
    Partition,
    apt_mirror,
    cache_key,
    fstab,
    load_guest,
    partition_devices,
    workload_script,
)
from kvmsnap_plugin.errors import HostError, ProcessError
from kvmsnap_plugin.host import mounts, process
from kvmsnap_plugin.paths import cache_root

log = logging.getLogger(__name__)


def build_debian_guest(cache: Path | None = None) -> DebianGuest:
    """Return the cached Debian guest, building it first if missing (about a minute).

    Safe to call from parallel test sessions: they wait for one another's build.
    """
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    key = cache_key(mirror)
    final = cache / f"debian-{key}"
    build_once(final, "build-info.json", lambda staging: _build_into(staging, cache, mirror, key),
               lock=cache / ".debian-build.lock")
    return load_guest(final)


def _build_into(staging: Path, cache: Path, mirror: str, key: str) -> None:
    ensure_debootstrap()
    _require_programs()
    log.info("building the Debian %s test guest %s (takes minutes)", SUITE, key)
    started = time.monotonic()
    info = _build_image(staging, cache / "debian-debs", mirror, key)
    info["build_seconds"] = round(time.monotonic() - started, 1)
    (staging / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("built the Debian test guest %s in %.0f s", key, info["build_seconds"])


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
    with mounts.loop_attached(raw, writable=True) as loop:
        devices = partition_devices(loop)
        partitions = _make_filesystems(devices)
        root = staging / "root"
        with mounts.mounted(devices[1], root, "ext4"):
            _debootstrap(root, debs, mirror)
            _configure(root, partitions, key)
            with chroot_mounts(root, debs):
                _chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               KERNEL_PACKAGE], timeout=1200)
            version = _export_kernel(root, staging)
            _tidy(root)
            _trim(root)
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


def _make_filesystems(devices: dict[int, Path]) -> tuple[Partition, ...]:
    """mkfs every partition; the ext4 is fully initialised now, not lazily in the guest."""
    made = []
    for part in LAYOUT:
        device = devices[part.number]
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
        _unmount_below(root)


def _configure(root: Path, partitions: Sequence[Partition], key: str) -> None:
    """Write the guest's configuration before the kernel (and its initramfs) goes in."""
    for relative, content in GUEST_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    (root / "etc/fstab").write_text(fstab(partitions))
    (root / "etc/machine-id").write_text(hashlib.sha256(key.encode()).hexdigest()[:32] + "\n")
    workload = root / "usr/local/sbin/kvmsnap-workload"
    workload.write_bytes(workload_script())
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
    _chroot(root, ["systemctl", "enable", "kvmsnap-workload.service",
                   "kvmsnap-layout.service"], timeout=60)
    _chroot(root, ["systemctl", "mask", *MASKED_UNITS], timeout=60)


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


@contextlib.contextmanager
def chroot_mounts(root: Path, debs: Path) -> Iterator[None]:
    """/proc, /sys, /dev for package scripts, and the shared .deb cache for apt."""
    try:
        for fstype, target in (("proc", root / "proc"), ("sysfs", root / "sys")):
            target.mkdir(parents=True, exist_ok=True)
            mounts.mount(fstype, target, fstype)
        for source, target in ((Path("/dev"), root / "dev"),
                               (debs, root / "var/cache/apt/archives")):
            target.mkdir(parents=True, exist_ok=True)
            mounts.bind_mount(source, target)
        yield
    finally:
        _unmount_below(root)


def _unmount_below(root: Path) -> None:
    """Unmount everything below ``root`` (not ``root`` itself); the mount points stay."""
    top = str(root.resolve())
    for target in mounts.mounts_under(root):
        if target != top:
            mounts.unmount(Path(target), remove=False)
