"""Watch a fork from the side: the clone QEMU's peak RSS and the RAM state file's size.

kvmsnap starts the clone as a child of this process (``Clone`` is a ``Machine``), with
``-incoming defer`` and its overlays in the fork's work directory. A thread polls
``/proc/self/task/*/children`` for that process and keeps the largest ``VmHWM`` (the
kernel's own peak-RSS counter) it reads before the clone exits; the last read is at most one
poll interval before the exit, when the guest is already shutting down. It also notes when
the RAM state file last grew: kvmsnap's ``ram_save_s`` comes from ``query-migrate``'s
``total-time``, which QEMU 7.2 can still report as 0 when a background snapshot's status is
already "completed".
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


class ForkSampler:
    def __init__(self, workdir: Path, interval: float = 0.02) -> None:
        self.workdir = workdir
        self.interval = interval
        self.clone_pid: int | None = None
        self.clone_hwm_kib = 0
        self.clone_rss_kib = 0
        self.samples = 0
        self.state_bytes = 0
        self.state_first_seen: float | None = None  # monotonic
        self.state_last_growth: float | None = None  # monotonic, +- one poll interval
        self._seen: dict[int, bool] = {}  # pid -> is it the clone?
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fork-sampler", daemon=True)

    def __enter__(self) -> ForkSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def result(self) -> dict[str, Any]:
        return {"clone_pid": self.clone_pid, "clone_peak_rss_bytes": self.clone_hwm_kib * 1024,
                "clone_samples": self.samples, "ram_state_bytes": self.state_bytes or None}

    def state_written_by(self) -> float | None:
        """When the RAM state file last grew (monotonic): the end of the RAM save."""
        return self.state_last_growth

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # a sampler must never break the benchmark
                continue
        self._sample()

    def _sample(self) -> None:
        for state in self.workdir.glob("*/ram.state"):
            try:
                size = state.stat().st_size
            except FileNotFoundError:
                continue
            now = time.monotonic()
            if self.state_first_seen is None:
                self.state_first_seen = now
            if size > self.state_bytes:
                self.state_bytes = size
                self.state_last_growth = now
        for pid in _children():
            # Only a positive answer is kept: between fork and exec a child still shows
            # this interpreter's command line.
            if not self._seen.get(pid):
                self._seen[pid] = self._is_clone(pid)
            if self._seen[pid]:
                self.clone_pid = pid
                status = _status(pid)
                if status:
                    self.samples += 1
                    self.clone_hwm_kib = max(self.clone_hwm_kib, status.get("VmHWM", 0))
                    self.clone_rss_kib = max(self.clone_rss_kib, status.get("VmRSS", 0))

    def _is_clone(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"-incoming" in argv and any(str(self.workdir).encode() in a for a in argv)


def _children() -> list[int]:
    pids = []
    base = Path(f"/proc/{os.getpid()}/task")
    for task in base.iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS in KiB, or {} if the process is gone."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return found
