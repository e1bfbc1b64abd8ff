"""The guest's ticker, seen from the host: when each tick arrived, and the gaps between them.

The demo guest (``DemoOptions(ticker=True)``) prints "T" every 10 ms on its second serial
port. QEMU serves that port as a unix socket; a separate reader process (tickreader.py)
stamps every chunk it receives with ``time.monotonic()``. Under TCG the guest's clock stops
while the VM is paused, so only these host-side arrival times show a pause: a pause of P ms
falling inside a tick interval of I ms makes one gap of about I + P ms.
"""

from __future__ import annotations

import bisect
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import percentile

READER = Path(__file__).with_name("tickreader.py")


@dataclass(frozen=True)
class Gap:
    start: float  # monotonic arrival of the tick before the gap
    seconds: float

    @property
    def ms(self) -> float:
        return self.seconds * 1000


class Ticker:
    """Start the reader process; ``qemu_args`` add the socket as the guest's ttyS1.

    Use as a context manager around the VM: on exit the reader is stopped (by its PID, it is
    our child) whatever happened.
    """

    def __init__(self, socket_dir: Path, log_dir: Path, name: str = "tick") -> None:
        self.socket = socket_dir / f"{name}.sock"
        self.log = log_dir / f"{name}.ticks"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cache: tuple[int, list[float]] = (0, [])

    @property
    def qemu_args(self) -> tuple[str, ...]:
        return ("-chardev", f"socket,id=benchtick,path={self.socket},server=on,wait=off",
                "-serial", "chardev:benchtick")

    def __enter__(self) -> Ticker:
        self.proc = subprocess.Popen([sys.executable, str(READER), str(self.socket),
                                      str(self.log)], stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- reading ----------------------------------------------------------------------
    def arrivals(self) -> list[float]:
        """Monotonic arrival times of all chunks of ticks so far."""
        try:
            size = self.log.stat().st_size
        except FileNotFoundError:
            return []
        if size != self._cache[0]:
            times = []
            for line in self.log.read_text().splitlines():
                if line and not line.startswith("#"):
                    try:
                        times.append(float(line.split()[0]))
                    except (ValueError, IndexError):
                        continue  # a line being written
            self._cache = (size, times)
        return self._cache[1]

    def wait_flowing(self, count: int = 20, timeout: float = 30.0) -> None:
        """Wait until ``count`` ticks arrived after now; the guest's ticker really runs."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            arrived = self.arrivals()
            if len(arrived) - bisect.bisect_left(arrived, since) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("the guest's ticker does not reach the host: is the demo initramfs "
                           "built from an init.sh with kvmsnap.ticker support?")


def gaps(arrivals: list[float], start: float, end: float) -> list[Gap]:
    """Every gap between consecutive arrivals that overlaps [start, end]."""
    first = max(0, bisect.bisect_left(arrivals, start) - 1)
    last = min(len(arrivals) - 1, bisect.bisect_right(arrivals, end))
    return [Gap(arrivals[i], arrivals[i + 1] - arrivals[i]) for i in range(first, last)
            if arrivals[i + 1] >= start and arrivals[i] <= end]


def inside(arrivals: list[float], start: float, end: float) -> list[Gap]:
    """The gaps lying wholly within [start, end] (for baseline windows)."""
    return [g for g in gaps(arrivals, start, end) if g.start >= start
            and g.start + g.seconds <= end]


def largest(found: list[Gap]) -> Gap | None:
    return max(found, key=lambda g: g.seconds) if found else None


def baseline(arrivals: list[float], start: float, end: float,
             chunk_s: float = 1.0) -> dict[str, object]:
    """The ticker's own jitter in a window without a fork: interval median, p99 and max,
    and the largest gap of each ``chunk_s`` piece (to compare with a window of that size)."""
    found = [g.ms for g in inside(arrivals, start, end)]
    chunks = []
    cursor = start
    while cursor + chunk_s <= end + 1e-6:
        gap = largest(inside(arrivals, cursor, cursor + chunk_s))
        if gap:
            chunks.append(gap.ms)
        cursor += chunk_s
    return {
        "n": len(found),
        "median_interval_ms": statistics.median(found) if found else None,
        "p99_ms": percentile(found, 99),
        "max_gap_ms": max(found) if found else None,
        "chunk_s": chunk_s,
        "chunk_max_gaps_ms": chunks,
    }
