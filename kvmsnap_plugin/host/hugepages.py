"""Re-collapse the parent's guest RAM into transparent huge pages, so that the fork's pause
stays short.

Why: background-snapshot prepares write tracking inside the pause, touching every 4 KiB
page of guest RAM (QEMU's ``ram_write_tracking_prepare()``), and a 2 MiB huge page counts
once where 512 small pages count 512 times. QEMU asks for huge pages (``MADV_HUGEPAGE``),
but every background snapshot splits them (each write fault un-protects 4 KiB), so the
*next* backup's pause is several times longer until khugepaged rebuilds them, which can
take hours. ``process_madvise(MADV_COLLAPSE)`` (Linux 6.1+, needs CAP_SYS_NICE) rebuilds
them now, outside the pause; bench/ measures what it buys (P1) and costs.

When: once the RAM snapshot has completed, in a thread (:class:`Recollapse`), while the clone
shuts down and the archivers run: the split is this backup's own doing and the rebuilt
pages are for the next one. Before the pause :func:`collapse_before_fork` runs the same
thing synchronously; after such a run it finds the pages whole and costs only the reading
of the page map (it does the work when the last run did not: the first backup, or one
killed before it got there).

On by default (``collapse_huge_pages``), bounded two ways:

- memory: MADV_COLLAPSE ignores khugepaged's ``max_ptes_none`` and would fill every 2 MiB
  range up, so a guest that touched little of its RAM would grow on the host. Only ranges
  with at most :func:`allowed_missing` pages absent are collapsed, read from
  ``/proc/PID/pagemap`` (present and mapped by QEMU alone: the shared zero page that
  QEMU's prepare step maps into untouched pages does not count);
- time: it stops after ``collapse_budget`` seconds (reported), the rest of the RAM keeps its
  small pages for this backup.

It never fails a backup: the kernel may refuse some ranges (EAGAIN), and that is reported.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.model import Collapse, ForkOptions, Parent, RamMethod

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_SYS_PROCESS_MADVISE = 440  # x86_64
_MADV_COLLAPSE = 25
_CHUNK = 32 << 20  # one call per run at most: a refused run loses little
PAGE = 4096
PAGES_PER_HUGE = HUGE_PAGE // PAGE
#: the most absent pages of 512 a range may have to be collapsed (1/8: the guest's host RSS
#: grows by at most 12.5% of what it collapses), whatever khugepaged's max_ptes_none allows
MAX_MISSING = 64
#: seconds per fork, then the rest keeps its small pages (a 2 GiB guest took 0.04-0.9 s)
DEFAULT_BUDGET_S = 2.0
_CAP_SYS_NICE = 23
_MAX_PTES_NONE = Path("/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_none")
#: pagemap's top byte -> 1 if bit 63 (present) and bit 56 (exclusively mapped) are set
_OWN_PAGE = bytes(1 if byte & 0x81 == 0x81 else 0 for byte in range(256))


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@dataclass(frozen=True)
class Mapping:
    low: int
    high: int
    rss_kib: int
    huge_kib: int
    page_kib: int = 4  # the kernel's page size here: 2048 for RAM in hugetlbfs pages
    anonymous: bool = True  # False: a memfd or a file (memory-backend-memfd / -file)


def guest_ram(pid: int) -> list[Mapping]:
    """QEMU's anonymous guest RAM blocks, the ones transparent huge pages apply to."""
    return [mapping for mapping in guest_ram_blocks(pid) if mapping.anonymous]


def guest_ram_blocks(pid: int) -> list[Mapping]:
    """Every guest RAM block of QEMU process ``pid``, whatever backs it: writable, not
    executable, MADV_HUGEPAGE and MADV_DONTFORK, as QEMU maps every RAM block (the TCG code
    buffer is executable); anonymous, or a memfd or hugetlbfs file."""
    found: list[Mapping] = []
    header: list[str] = []
    sizes: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            header, sizes = line.split(), {}
        elif line.startswith(("Rss:", "AnonHugePages:", "KernelPageSize:")):
            sizes[head] = int(line.split()[1])
        elif line.startswith("VmFlags:") and _is_guest_ram(header, line.split()[1:]):
            low, high = (int(x, 16) for x in header[0].split("-"))
            found.append(Mapping(low, high, sizes.get("Rss:", 0),
                                 sizes.get("AnonHugePages:", 0),
                                 sizes.get("KernelPageSize:", 4), len(header) < 6))
    return found


def _is_guest_ram(header: list[str], flags: list[str]) -> bool:
    perms = header[1]
    return perms.startswith("rw") and "x" not in perms and "hg" in flags and "dc" in flags


def huge_share(mappings: list[Mapping]) -> float:
    """The share of the resident guest RAM that is in huge pages (0.0-1.0)."""
    rss = sum(m.rss_kib for m in mappings)
    return sum(m.huge_kib for m in mappings) / rss if rss else 0.0


def shortens_the_pause(parent: Parent, options: ForkOptions) -> bool:
    """``collapse_huge_pages`` (on by default) applies: a running parent, and a background
    snapshot's pause to shorten (stop-and-copy's pause copies the RAM, pages or not)."""
    return (options.collapse_huge_pages and not parent.offline
            and options.method is not RamMethod.STOP_AND_COPY)


def collapse(pid: int, budget_s: float = DEFAULT_BUDGET_S,
             max_missing: int | None = None) -> Collapse:
    """Rebuild huge pages in the (nearly) resident 2 MiB ranges of QEMU process ``pid``'s
    guest RAM, until ``budget_s`` seconds have passed (synchronous)."""
    started = time.monotonic()
    missing = allowed_missing() if max_missing is None else max_missing
    before = guest_ram(pid)
    plan = plan_collapse(pid, before, missing)
    errors: set[str] = set()
    done = 0
    fd = os.pidfd_open(pid)
    try:
        for start, length in plan.runs:
            if time.monotonic() - started > budget_s:
                break
            errno = _madvise_collapse(fd, start, length)
            if errno:
                errors.add(os.strerror(errno))
            done += length
    finally:
        os.close(fd)
    after = guest_ram(pid)
    rss_growth = sum(m.rss_kib for m in after) - sum(m.rss_kib for m in before)
    return Collapse(time.monotonic() - started, huge_share(before), huge_share(after),
                    tuple(sorted(errors)), collapsed_mib=done >> 20,
                    sparse_mib=plan.sparse * HUGE_PAGE >> 20,
                    unfinished_mib=(plan.eligible_bytes - done) >> 20,
                    rss_growth_kib=rss_growth, budget_s=budget_s, max_missing=missing)


def allowed_missing() -> int:
    """How many of a 2 MiB range's 512 small pages may be absent for it to be collapsed:
    what khugepaged would fill in anyway (``max_ptes_none``), at most :data:`MAX_MISSING`."""
    try:
        system = int(_MAX_PTES_NONE.read_text())
    except (OSError, ValueError):
        system = PAGES_PER_HUGE - 1  # the kernel's default
    return max(0, min(system, MAX_MISSING))


@dataclass(frozen=True)
class Plan:
    runs: tuple[tuple[int, int], ...]  # (start, length): adjacent ranges, one call each
    sparse: int  # 2 MiB ranges left alone: too few of their pages resident

    @property
    def eligible_bytes(self) -> int:
        return sum(length for _, length in self.runs)


def plan_collapse(pid: int, mappings: list[Mapping], max_missing: int) -> Plan:
    """Which ranges of ``mappings`` to collapse, from ``/proc/PID/pagemap``."""
    starts: list[int] = []
    sparse = 0
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for mapping in mappings:
            for low, high in _windows(mapping):
                entries = os.pread(pagemap.fileno(), (high - low) // PAGE * 8,
                                   low // PAGE * 8)
                found, skipped = eligible_ranges(entries, low, max_missing)
                starts += found
                sparse += skipped
    return Plan(tuple(runs(starts)), sparse)


def _windows(mapping: Mapping) -> list[tuple[int, int]]:
    """The mapping's whole 2 MiB ranges, in pieces of at most :data:`_CHUNK` bytes."""
    start = (mapping.low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = mapping.high & ~(HUGE_PAGE - 1)
    return [(low, min(low + _CHUNK, end)) for low in range(start, end, _CHUNK)]


def eligible_ranges(entries: bytes, base: int, max_missing: int) -> tuple[list[int], int]:
    """From the pagemap ``entries`` (8 bytes per 4 KiB page) of memory starting at the
    2 MiB-aligned ``base``: the start addresses of the 2 MiB ranges with at most
    ``max_missing`` pages not our own, and how many ranges were left out. A page counts if
    it is present and mapped by this process alone (bits 63 and 56): not absent, not
    swapped out, not the shared zero page, not shared with another process (KSM)."""
    own = entries[7::8].translate(_OWN_PAGE)  # one byte per page: 1 if it counts
    found, sparse = [], 0
    for index in range(len(own) // PAGES_PER_HUGE):
        resident = own.count(1, index * PAGES_PER_HUGE, (index + 1) * PAGES_PER_HUGE)
        if PAGES_PER_HUGE - resident <= max_missing:
            found.append(base + index * HUGE_PAGE)
        elif resident:
            sparse += 1
    return found, sparse


def runs(starts: list[int], limit: int = _CHUNK) -> list[tuple[int, int]]:
    """Sorted 2 MiB range starts joined into (start, length) runs of at most ``limit``
    bytes: one system call per run, and the time budget is checked between calls."""
    out: list[tuple[int, int]] = []
    for start in starts:
        if out and out[-1][0] + out[-1][1] == start and out[-1][1] + HUGE_PAGE <= limit:
            out[-1] = (out[-1][0], out[-1][1] + HUGE_PAGE)
        else:
            out.append((start, HUGE_PAGE))
    return out


def _madvise_collapse(pidfd: int, start: int, length: int) -> int:
    """``process_madvise(MADV_COLLAPSE)`` on one range; 0, or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    vec = _IoVec(start, length)
    if libc.syscall(_SYS_PROCESS_MADVISE, pidfd, ctypes.byref(vec), 1, _MADV_COLLAPSE, 0) < 0:
        return ctypes.get_errno()
    return 0


def collapse_before_fork(pid: int, budget_s: float = DEFAULT_BUDGET_S,
                         when: str = "before the pause") -> Collapse | None:
    """:func:`collapse`, logged; None (and a warning) if the host cannot do it at all."""
    try:
        result = collapse(pid, budget_s)
    except OSError as exc:
        log.warning("could not re-collapse the guest RAM's huge pages %s: %s", when, exc)
        return None
    log.info("guest RAM in huge pages %s: %.0f%% -> %.0f%% (%d MiB re-collapsed in %.2f s, "
             "RSS %+d MiB%s%s)", when, 100 * result.share_before, 100 * result.share_after,
             result.collapsed_mib, result.seconds, result.rss_growth_kib >> 10,
             f"; {result.unfinished_mib} MiB left: out of its {budget_s:g} s budget"
             if result.unfinished_mib else "",
             f"; kernel said: {', '.join(result.errors)}" if result.errors else "")
    return result


class Recollapse:
    """:func:`collapse_before_fork` in a thread of its own, started once the RAM snapshot
    completed; :meth:`result` waits for it (at most the budget, plus reading the page map).
    The thread only reads ``/proc`` and asks the kernel to rebuild pages: a run that ends
    without asking leaves nothing behind (the thread ends on its own)."""

    def __init__(self, pid: int, budget_s: float = DEFAULT_BUDGET_S) -> None:
        self._result: Collapse | None = None
        self._thread = threading.Thread(target=self._run, args=(pid, budget_s),
                                        name=f"kvmsnap-recollapse-{pid}")
        self._thread.start()

    def _run(self, pid: int, budget_s: float) -> None:
        try:
            self._result = collapse_before_fork(pid, budget_s, "after the RAM snapshot")
        except Exception as exc:  # never a backup's failure, see the module
            log.warning("re-collapsing the guest RAM's huge pages failed: %s", exc)

    def result(self) -> Collapse | None:
        self._thread.join()
        return self._result


def warm_guest_ram(pid: int) -> int:
    """Read one byte of every page of QEMU process ``pid``'s guest RAM, just before the
    pause: what QEMU's prepare step (``ram_block_populate_read()``) does inside the pause,
    at the same step (4 KiB, or the mapping's page size: 2 MiB on hugetlbfs).

    Why: that step's cost is mostly cold address translation (on a host that is itself a
    VM, nested page tables): measured here, 1.5 GiB read at 4 KiB stride took 116-241 ms
    when idle for some seconds and 15-37 ms right after a first pass, and the guest RAM of
    an idle parent is cold. Done before ``stop`` the first pass costs the parent nothing (it
    runs) and the prepare step inside the pause finds the translations warm. A page never
    touched gets mapped as that step would map it moments later (the zero page for anonymous
    RAM; memory of its own in a memfd without ``prealloc``). The number of pages read; 0 if
    the kernel refused (never an error: it only makes the pause shorter).
    """
    try:
        mappings = guest_ram_blocks(pid)  # hugetlbfs RAM is as cold (bench P6): 13-124 ms
    except OSError:  # the parent is gone: the fork will say so
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    batch = 1024  # IOV_MAX
    sink = ctypes.create_string_buffer(batch)
    local = array("Q", [ctypes.addressof(sink), 1] * batch)  # every byte lands in one place
    remote = array("Q", [0, 1] * batch)
    local_ptr, _ = local.buffer_info()
    remote_ptr, _ = remote.buffer_info()
    read = 0
    for mapping in mappings:
        step = mapping.page_kib * 1024  # QEMU reads at the RAM block's page size too
        for start in range(mapping.low, mapping.high, batch * step):
            count = min(batch, (mapping.high - start) // step)
            remote[0:2 * count:2] = array("Q", range(start, start + count * step, step))
            done = libc.process_vm_readv(pid, ctypes.c_void_p(local_ptr), count,
                                         ctypes.c_void_p(remote_ptr), count, 0)
            if done < 0:
                return read
            read += done
    return read


def collapse_supported() -> tuple[bool, str]:
    """Can this host collapse a QEMU's huge pages? Linux 6.1+, THP not ``never``,
    CAP_SYS_NICE (process_madvise on another process), then tried for real on 2 MiB of
    our own memory."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        if "[never]" in thp.read_text():
            return False, "transparent huge pages are disabled ([never])"
    except OSError:
        return False, "no transparent huge pages in this kernel"
    release = os.uname().release
    if _kernel_version(release) < (6, 1):
        return False, f"Linux {release} has no MADV_COLLAPSE (needs 6.1+)"
    if not _has_capability(_CAP_SYS_NICE):
        return False, "no CAP_SYS_NICE (process_madvise on a QEMU needs it; run as root)"
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
        return True, (f"process_madvise(MADV_COLLAPSE) works (Linux {release}, "
                      f"CAP_SYS_NICE; ranges with at most {allowed_missing()} of 512 pages "
                      "absent)")
    return False, f"process_madvise(MADV_COLLAPSE): {os.strerror(errno)} (needs Linux 6.1+)"


def _kernel_version(release: str) -> tuple[int, ...]:
    """``6.18.44-fc-v1045`` -> (6, 18)."""
    numbers = release.split("-", 1)[0].split(".")[:2]
    return tuple(int(n) for n in numbers if n.isdigit())


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False
