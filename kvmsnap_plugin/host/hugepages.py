"""Re-collapse the parent's guest RAM into transparent huge pages before the fork's pause.

Why: background-snapshot prepares write tracking inside the pause, touching every 4 KiB
page of guest RAM (QEMU 7.2's ``ram_write_tracking_prepare()``), and a 2 MiB huge page
counts once where 512 small pages count 512 times. QEMU asks for huge pages
(``MADV_HUGEPAGE``), but every background snapshot splits them (each write fault
un-protects 4 KiB), so the *next* backup's pause is several times longer until khugepaged
rebuilds them, which can take hours. ``process_madvise(MADV_COLLAPSE)`` (Linux 6.1+, needs
CAP_SYS_NICE) rebuilds them now, outside the pause; bench/ measures what it buys (P1).

It is opt-in (``collapse_huge_pages``): it costs the host CPU time (0.04-0.9 s per fork
measured for 256 MiB-2 GiB) and may grow the guest's RSS where small pages were missing.
It never fails a backup: the kernel may refuse some ranges (EAGAIN), and that is reported.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.model import Collapse

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_SYS_PROCESS_MADVISE = 440  # x86_64
_MADV_COLLAPSE = 25
_CHUNK = 64 << 20  # one call per chunk: a refused chunk loses little


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@dataclass(frozen=True)
class Mapping:
    low: int
    high: int
    rss_kib: int
    huge_kib: int




def guest_ram(pid: int) -> list[Mapping]:
    """QEMU's guest RAM blocks: anonymous, writable, not executable, MADV_HUGEPAGE and
    MADV_DONTFORK, as QEMU maps every RAM block (the TCG code buffer is executable)."""
    found: list[Mapping] = []
    header: list[str] = []
    sizes: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            header, sizes = line.split(), {}
        elif line.startswith(("Rss:", "AnonHugePages:")):
            sizes[head] = int(line.split()[1])
        elif line.startswith("VmFlags:") and _is_guest_ram(header, line.split()[1:]):
            low, high = (int(x, 16) for x in header[0].split("-"))
            found.append(Mapping(low, high, sizes.get("Rss:", 0),
                                 sizes.get("AnonHugePages:", 0)))
    return found


def _is_guest_ram(header: list[str], flags: list[str]) -> bool:
    anonymous = len(header) < 6
    perms = header[1]
    return (anonymous and perms.startswith("rw") and "x" not in perms
            and "hg" in flags and "dc" in flags)


def huge_share(mappings: list[Mapping]) -> float:
    """The share of the resident guest RAM that is in huge pages (0.0-1.0)."""
    rss = sum(m.rss_kib for m in mappings)
    return sum(m.huge_kib for m in mappings) / rss if rss else 0.0


def collapse(pid: int) -> Collapse:
    """Rebuild huge pages in the guest RAM of QEMU process ``pid`` (synchronous)."""
    started = time.monotonic()
    before = guest_ram(pid)
    errors: set[str] = set()
    fd = os.pidfd_open(pid)
    try:
        for mapping in before:
            for start, length in _chunks(mapping):
                errno = _madvise_collapse(fd, start, length)
                if errno:
                    errors.add(os.strerror(errno))
    finally:
        os.close(fd)
    after = guest_ram(pid)
    return Collapse(time.monotonic() - started, huge_share(before), huge_share(after),
                    tuple(sorted(errors)))


def _madvise_collapse(pidfd: int, start: int, length: int) -> int:
    """``process_madvise(MADV_COLLAPSE)`` on one range; 0, or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = _IoVec(start, length)
    if libc.syscall(_SYS_PROCESS_MADVISE, pidfd, ctypes.byref(vec), 1, _MADV_COLLAPSE, 0) < 0:
        return ctypes.get_errno()
    return 0


def _chunks(mapping: Mapping) -> list[tuple[int, int]]:
    start = (mapping.low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = mapping.high & ~(HUGE_PAGE - 1)
    return [(offset, min(_CHUNK, end - offset)) for offset in range(start, end, _CHUNK)]


def collapse_before_fork(pid: int) -> Collapse | None:
    """:func:`collapse`, logged; None (and a warning) if the host cannot do it at all."""
    try:
        result = collapse(pid)
    except OSError as exc:
        log.warning("could not re-collapse the guest RAM's huge pages: %s", exc)
        return None
    log.info("guest RAM in huge pages: %.0f%% -> %.0f%% (re-collapsed in %.2f s%s)",
             100 * result.share_before, 100 * result.share_after, result.seconds,
             f"; kernel said: {', '.join(result.errors)}" if result.errors else "")
    return result


def collapse_supported() -> tuple[bool, str]:
    """Can this host collapse huge pages? Tried for real on 2 MiB of our own memory."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        if "[never]" in thp.read_text():
            return False, "transparent huge pages are disabled ([never])"
    except OSError:
        return False, "no transparent huge pages in this kernel"
    # Private and anonymous, like QEMU's guest RAM (shared memory follows shmem_enabled).
    area = mmap.mmap(-1, 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = ctypes.c_char.from_buffer(area)
    try:
        start = (ctypes.addressof(buffer) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        ctypes.memset(start, 1, HUGE_PAGE)  # resident, so there is something to collapse
        fd = os.pidfd_open(os.getpid())
        try:
            errno = _madvise_collapse(fd, start, HUGE_PAGE)
        finally:
            os.close(fd)
    finally:
        del buffer
        area.close()
    if errno in (0, 11):  # 11, EAGAIN: supported, no huge page free right now
        return True, "process_madvise(MADV_COLLAPSE) works"
    return False, f"process_madvise(MADV_COLLAPSE): {os.strerror(errno)} (needs Linux 6.1+)"
