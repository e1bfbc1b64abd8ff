"""Transparent huge pages of the parent's guest RAM: measure them, and re-collapse them.

Why the benchmarks care: background-snapshot write-protects all of guest RAM (userfaultfd)
inside the pause. QEMU backs guest RAM with transparent huge pages (``MADV_HUGEPAGE``), and
write-protecting a 2 MiB huge page is one operation, 512 for the same memory in 4 KiB pages.
The first background snapshot splits the huge pages (every write fault un-protects 4 KiB),
so the next one, if khugepaged has not re-collapsed them yet, pauses the guest several times
longer. The benchmark measures both states; :func:`collapse` brings the first one back with
``process_madvise(MADV_COLLAPSE)`` (Linux 6.1+, needs CAP_SYS_NICE), as kvmsnap itself could
after each backup.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

MIB = 1 << 20
HUGE = 2 * MIB
_SYS_PROCESS_MADVISE = 440  # x86_64
_MADV_COLLAPSE = 25
_CHUNK = 64 * MIB  # one call per chunk: a partial failure loses little


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def guest_ram_ranges(pid: int, ram_bytes: int) -> list[tuple[int, int]]:
    """The anonymous, writable, non-executable mappings of QEMU that hold guest RAM.

    Found by size: QEMU maps each RAM block whole (the TCG code buffer, of similar size,
    is executable and so excluded).
    """
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        low, high = (int(x, 16) for x in parts[0].split("-"))
        perms = parts[1]
        anonymous = len(parts) < 6
        if (anonymous and perms.startswith("rw") and "x" not in perms
                and ram_bytes <= high - low <= ram_bytes + 4 * MIB):
            found.append((low, high))
    return found


def huge_share(pid: int, ranges: list[tuple[int, int]]) -> dict[str, float] | None:
    """RSS and AnonHugePages (MiB) of ``ranges``; None if unreadable."""
    wanted = {f"{low:x}-{high:x}" for low, high in ranges}
    rss = huge = 0
    current = False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            current = head in wanted
        elif current and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif current and line.startswith("AnonHugePages:"):
            huge += int(line.split()[1])
    return {"rss_mib": rss / 1024, "huge_mib": huge / 1024,
            "huge_share": huge / rss if rss else 0.0}


def collapse(pid: int, ranges: list[tuple[int, int]]) -> dict[str, object]:
    """Ask the kernel to rebuild huge pages in ``ranges`` of process ``pid`` (synchronous)."""
    libc = ctypes.CDLL(None, use_errno=True)
    started = time.monotonic()
    errors: list[str] = []
    fd = os.pidfd_open(pid)
    try:
        for low, high in ranges:
            start = (low + HUGE - 1) & ~(HUGE - 1)
            end = high & ~(HUGE - 1)
            for offset in range(start, end, _CHUNK):
                vec = _IoVec(offset, min(_CHUNK, end - offset))
                if libc.syscall(_SYS_PROCESS_MADVISE, fd, ctypes.byref(vec), 1,
                                _MADV_COLLAPSE, 0) < 0:
                    errors.append(os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)
    return {"seconds": time.monotonic() - started, "errors": sorted(set(errors))}
