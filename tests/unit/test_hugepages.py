"""Which 2 MiB ranges of guest RAM kvmsnap re-collapses into huge pages (hugepages.py)."""

import contextlib
import ctypes
import mmap
import os
import struct

from kvmsnap_plugin.host import hugepages
from kvmsnap_plugin.host.hugepages import HUGE_PAGE, PAGES_PER_HUGE, eligible_ranges, runs

OWN = (1 << 63) | (1 << 56)  # present, mapped by this process alone
ZERO_PAGE = 1 << 63  # present, shared: what a read of an untouched page maps
SWAPPED = 1 << 62
BASE = 0x7F00_0000_0000


@contextlib.contextmanager
def aligned_memory(huge_pages: int):
    """``huge_pages`` x 2 MiB of private anonymous memory, 2 MiB aligned: its address."""
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    size = (huge_pages + 1) * HUGE_PAGE
    area = libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        yield (area + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    finally:
        libc.munmap(ctypes.c_void_p(area), ctypes.c_size_t(size))


def madvise(address: int, length: int, advice: int) -> None:
    libc = ctypes.CDLL(None)
    assert libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) == 0


def entries(*ranges: list[int]) -> bytes:
    return b"".join(struct.pack("<Q", e) for pages in ranges for e in pages)


def test_ranges_with_at_most_max_missing_pages_absent_are_chosen():
    full = [OWN] * PAGES_PER_HUGE
    almost = [OWN] * (PAGES_PER_HUGE - 64) + [0] * 64
    too_sparse = [OWN] * (PAGES_PER_HUGE - 65) + [0] * 65
    empty = [0] * PAGES_PER_HUGE
    found, sparse = eligible_ranges(entries(full, almost, too_sparse, empty), BASE, 64)
    assert found == [BASE, BASE + HUGE_PAGE]
    assert sparse == 1  # the empty range is not "sparse": nothing there to fill up
    assert eligible_ranges(entries(full, almost), BASE, 0) == ([BASE], 1)


def test_the_zero_page_swapped_and_shared_pages_count_as_missing():
    zero = [ZERO_PAGE] * PAGES_PER_HUGE  # QEMU's prepare step reads every page
    swapped = [SWAPPED] * PAGES_PER_HUGE
    half_zero = [OWN] * (PAGES_PER_HUGE // 2) + [ZERO_PAGE] * (PAGES_PER_HUGE // 2)
    assert eligible_ranges(entries(zero, swapped, half_zero), BASE, 511)[0] == [
        BASE + 2 * HUGE_PAGE]
    assert eligible_ranges(entries(zero, swapped, half_zero), BASE, 64) == ([], 1)


def test_adjacent_ranges_join_into_runs_up_to_the_limit():
    starts = [BASE, BASE + HUGE_PAGE, BASE + 2 * HUGE_PAGE, BASE + 5 * HUGE_PAGE]
    assert runs(starts) == [(BASE, 3 * HUGE_PAGE), (BASE + 5 * HUGE_PAGE, HUGE_PAGE)]
    assert runs(starts, limit=2 * HUGE_PAGE) == [
        (BASE, 2 * HUGE_PAGE), (BASE + 2 * HUGE_PAGE, HUGE_PAGE),
        (BASE + 5 * HUGE_PAGE, HUGE_PAGE)]
    assert runs([]) == []


def test_allowed_missing_follows_khugepaged_but_never_above_kvmsnaps_cap(tmp_path,
                                                                         monkeypatch):
    knob = tmp_path / "max_ptes_none"
    monkeypatch.setattr(hugepages, "_MAX_PTES_NONE", knob)
    for system, allowed in (("511\n", hugepages.MAX_MISSING), ("0\n", 0), ("10\n", 10)):
        knob.write_text(system)
        assert hugepages.allowed_missing() == allowed
    knob.unlink()
    assert hugepages.allowed_missing() == hugepages.MAX_MISSING


def test_the_plan_reads_this_process_pagemap():
    """On real memory: a fully written range is chosen, a half-written one is not, and a
    range only read (the shared zero page) is not even sparse."""
    with aligned_memory(3) as low:
        madvise(low, 3 * HUGE_PAGE, 15)  # MADV_NOHUGEPAGE: 4 KiB pages
        ctypes.memset(low, 1, HUGE_PAGE)
        ctypes.memset(low + HUGE_PAGE, 1, HUGE_PAGE // 2)
        for page in range(low + 2 * HUGE_PAGE, low + 3 * HUGE_PAGE, mmap.PAGESIZE):
            ctypes.c_char.from_address(page).value  # noqa: B018 - a read maps the zero page
        mapping = hugepages.Mapping(low, low + 3 * HUGE_PAGE, 0, 0)
        plan = hugepages.plan_collapse(os.getpid(), [mapping], 64)
        assert plan.runs == ((low, HUGE_PAGE),) and plan.sparse == 1


def test_kernel_versions_are_compared_as_numbers():
    assert hugepages._kernel_version("6.18.44-fc-v1045") == (6, 18)
    assert hugepages._kernel_version("6.1.0-28-amd64") >= (6, 1)
    assert hugepages._kernel_version("5.10.0-30-amd64") < (6, 1)


def test_doctor_says_why_collapsing_is_not_available(monkeypatch):
    monkeypatch.setattr(hugepages.os, "uname", lambda: os.uname_result(
        ("Linux", "h", "5.10.0-30-amd64", "#1", "x86_64")))
    works, why = hugepages.collapse_supported()
    assert not works and ("6.1" in why or "[never]" in why)
    monkeypatch.undo()
    monkeypatch.setattr(hugepages, "_has_capability", lambda bit: False)
    works, why = hugepages.collapse_supported()
    assert not works and ("CAP_SYS_NICE" in why or "[never]" in why)


def test_collapsing_stops_at_its_time_budget_and_says_what_it_left():
    """On this process's own memory, mapped like QEMU's guest RAM (MADV_HUGEPAGE,
    MADV_DONTFORK) but written in 4 KiB pages first."""
    with aligned_memory(8) as low:
        madvise(low, 8 * HUGE_PAGE, 15)  # MADV_NOHUGEPAGE: written in 4 KiB pages
        ctypes.memset(low, 1, 8 * HUGE_PAGE)
        for advice in (14, 10):  # MADV_HUGEPAGE, MADV_DONTFORK: what QEMU asks for
            madvise(low, 8 * HUGE_PAGE, advice)
        none = hugepages.collapse(os.getpid(), budget_s=0.0)
        assert none.collapsed_mib == 0 and none.unfinished_mib >= 16
        assert none.budget_s == 0.0
        done = hugepages.collapse(os.getpid(), budget_s=60.0)
        assert done.collapsed_mib >= 16 and done.unfinished_mib == 0
        # (khugepaged may have collapsed some first: MADV_HUGEPAGE wakes it for this mm)
        assert done.share_after > 0.99 or done.errors
        assert abs(done.rss_growth_kib) < 1024  # the ranges were full: nothing to fill up


def test_the_rebuild_after_the_snapshot_runs_in_a_thread_and_never_raises():
    with aligned_memory(4) as low:
        madvise(low, 4 * HUGE_PAGE, 15)  # MADV_NOHUGEPAGE: written in 4 KiB pages
        ctypes.memset(low, 1, 4 * HUGE_PAGE)
        for advice in (14, 10):  # MADV_HUGEPAGE, MADV_DONTFORK: what QEMU asks for
            madvise(low, 4 * HUGE_PAGE, advice)
        done = hugepages.Recollapse(os.getpid(), budget_s=60.0).result()
        assert done is not None and done.collapsed_mib >= 8 and done.unfinished_mib == 0
        assert done.share_after > 0.99 or done.errors
    # A QEMU that is gone by then: a warning, no result, no exception.
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert hugepages.Recollapse(child).result() is None


def test_the_guest_ram_is_read_ahead_of_the_pause_page_by_page():
    with aligned_memory(4) as low:
        ctypes.memset(low, 1, 4 * HUGE_PAGE)
        for advice in (14, 10):  # MADV_HUGEPAGE, MADV_DONTFORK: what QEMU asks for
            madvise(low, 4 * HUGE_PAGE, advice)
        ram = hugepages.guest_ram(os.getpid())
        pages = sum((m.high - m.low) // hugepages.PAGE for m in ram)
        assert pages >= 4 * PAGES_PER_HUGE
        assert hugepages.warm_guest_ram(os.getpid()) == pages  # one byte of every page
    child = os.fork()  # a QEMU gone by then: nothing read, no exception
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    assert hugepages.warm_guest_ram(child) == 0


@contextlib.contextmanager
def memfd_ram(huge_pages: int, hugetlb: bool):
    """Shared memfd memory as memory-backend-memfd maps it (hugetlb=on: in 2 MiB hugetlbfs
    pages), with the advice QEMU gives every RAM block: its address."""
    flags = os.MFD_HUGETLB | os.MFD_HUGE_2MB if hugetlb else 0
    fd = os.memfd_create("memory-backend-memfd", flags)
    try:
        os.ftruncate(fd, huge_pages * HUGE_PAGE)
        libc = ctypes.CDLL(None)
        libc.mmap.restype = ctypes.c_void_p
        size = ctypes.c_size_t(huge_pages * HUGE_PAGE)
        area = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        assert area not in (None, ctypes.c_void_p(-1).value)
        try:
            ctypes.memset(area, 1, huge_pages * HUGE_PAGE)
            for advice in (14, 10):  # MADV_HUGEPAGE, MADV_DONTFORK
                madvise(area, huge_pages * HUGE_PAGE, advice)
            yield area
        finally:
            libc.munmap(ctypes.c_void_p(area), size)
    finally:
        os.close(fd)


def test_ram_in_a_memfd_or_hugetlbfs_is_read_ahead_at_its_page_size_but_never_collapsed(
        huge_page_pool):
    huge_page_pool(2)
    with memfd_ram(2, hugetlb=True) as huge, memfd_ram(1, hugetlb=False) as shared:
        blocks = {m.low: m for m in hugepages.guest_ram_blocks(os.getpid())}
        assert blocks[huge].page_kib == 2048 and not blocks[huge].anonymous
        assert blocks[shared].page_kib == 4 and not blocks[shared].anonymous
        assert not {huge, shared} & {m.low for m in hugepages.guest_ram(os.getpid())}
        anonymous = sum((m.high - m.low) // hugepages.PAGE
                        for m in hugepages.guest_ram(os.getpid()))
        # QEMU's prepare step reads one byte per page of the block's page size: so does this
        assert hugepages.warm_guest_ram(os.getpid()) == anonymous + 2 + PAGES_PER_HUGE
