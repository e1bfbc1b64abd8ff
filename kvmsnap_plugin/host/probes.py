"""Facts about this host: QEMU, the usable accelerator, userfaultfd write-protect.

The accelerator is decided by a bounded probe, never by the existence of /dev/kvm: on
nested-virtualisation hosts /dev/kvm exists while a Linux guest hangs under KVM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
from pathlib import Path

from kvmsnap_plugin.host import process
from kvmsnap_plugin.paths import cache_root

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT = 20.0

_SYS_USERFAULTFD = 323  # x86_64
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFD_API = 0xAA
_UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0


def qemu_version() -> tuple[int, int, int]:
    out = process.run([process.find_program(QEMU, "qemu-system-x86"), "--version"],
                      timeout=30).stdout
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else (0, 0, 0)


def uffd_wp_supported() -> tuple[bool, str]:
    """Can this process use userfaultfd write-protection (QEMU's background-snapshot)?"""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"userfaultfd() failed: {os.strerror(err)}"
    try:
        api = (ctypes.c_uint64 * 3)(_UFFD_API, 0, 0)
        if libc.ioctl(fd, _UFFDIO_API, api) < 0:
            return False, f"UFFDIO_API failed: {os.strerror(ctypes.get_errno())}"
        if api[1] & _UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            return True, "userfaultfd write-protect available"
        return False, "the kernel lacks userfaultfd write-protect (needs Linux 5.7+)"
    finally:
        os.close(fd)


def kvm_usable(kernel: Path, initrd: Path | None, timeout: float = PROBE_TIMEOUT, *,
               booted: str = "KVMSNAP-PROBE-OK") -> tuple[bool, str]:
    """Boot a kernel under KVM; True if it says ``booted`` on its console and ends in time
    (the demo guest's probe flag; or any kernel without an initrd: its root-mount panic)."""
    try:
        with open("/dev/kvm", "rb+", buffering=0):
            pass
    except OSError as exc:
        return False, f"/dev/kvm not usable: {exc.strerror}"
    with tempfile.TemporaryDirectory(prefix="kvmsnap-probe-") as tmp:
        log_path = Path(tmp) / "console.log"
        argv = [process.find_program(QEMU, "qemu-system-x86"), "-accel", "kvm", "-m", "128",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", kernel, *(["-initrd", initrd] if initrd else []),
                "-append", "console=ttyS0 quiet panic=-1 kvmsnap.probe=1",
                "-chardev", f"file,id=c,path={log_path}", "-serial", "chardev:c"]
        proc = process.spawn(argv)
        try:
            proc.wait(timeout)
        except Exception:
            process.stop(proc, grace=2)
            return False, f"a guest under KVM did not boot within {timeout:g} s (nested KVM?)"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if booted in text:
            return True, "a guest booted under KVM"
        return False, f"QEMU with KVM exited with code {proc.returncode} before booting"


def choose_accelerator(kernel: Path, initrd: Path | None, *,
                       booted: str = "KVMSNAP-PROBE-OK") -> tuple[str, str]:
    """("kvm"|"tcg", why). KVMSNAP_ACCEL overrides; the probe is cached until reboot."""
    known = cached_accelerator()
    if known:
        return known
    ok, why = kvm_usable(kernel, initrd, booted=booted)
    accel = "kvm" if ok else "tcg"
    cache = _probe_cache()
    if cache:
        cache.write_text(f"{accel} {why}\n")
    return accel, why


def cached_accelerator() -> tuple[str, str] | None:
    """The accelerator KVMSNAP_ACCEL forces, or the one a probe found since boot."""
    forced = os.environ.get("KVMSNAP_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced, "set by KVMSNAP_ACCEL"
    cache = _probe_cache()
    if cache and cache.exists():
        accel, _, why = cache.read_text().partition(" ")
        return accel, f"{why.strip()} (cached probe)"
    return None


def _probe_cache() -> Path | None:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    cache_root().mkdir(parents=True, exist_ok=True)
    return cache_root() / f"accel-{boot_id}"
