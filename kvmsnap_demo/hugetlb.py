"""The host's pool of 2 MiB hugetlbfs pages, grown for the guests of a test or a benchmark.

One holder at a time, machine-wide (a file lock): two sessions that each read the pool's
size, grow it and set it back could otherwise interleave and leave the host holding pages
for good, or make each other's size checks fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmsnap_demo.cache import cache_lock
from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.paths import cache_root

POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
FREE = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")


def free_pages() -> int:
    return int(FREE.read_text())


@contextlib.contextmanager
def held_pool() -> Iterator[Callable[[int], None]]:
    """``grow(pages)``: that many more pages than the pool had when this was entered; the
    pool is set back on the way out, whatever happened."""
    with cache_lock(cache_root() / ".huge-page-pool.lock"):
        before = int(POOL.read_text())

        def grow(pages: int) -> None:
            POOL.write_text(f"{before + pages}\n")
            granted = int(POOL.read_text()) - before
            if granted != pages:
                raise HostError(f"the kernel gave {granted} of {pages} 2 MiB huge pages",
                                "free some memory (or drop caches), then run again")

        try:
            yield grow
        finally:
            POOL.write_text(f"{before}\n")
