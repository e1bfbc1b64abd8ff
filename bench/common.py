"""Shared pieces of the benchmarks: settings, the machine record, statistics, progress."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmsnap_plugin.host import probes

MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """What one run measures; ``quick`` picks small sizes and one repetition."""

    quick: bool
    out: Path
    only: frozenset[str]
    reps: int
    ram_mib: tuple[int, ...]  # P1/P3 guest RAM sizes
    fill_ratio: float  # share of guest RAM filled with random data (RAM really in use)
    baseline_s: float  # ticker window without a fork, before each fork
    settle_s: float  # pause after a fork before the next baseline window
    warmup: bool  # one discarded fork per VM (cold caches, first qemu-img, ...)
    write_mib: tuple[int, ...]  # P4 amounts written during the backup
    p2_disk_mib: int = 2048  # P2's mixed-data guest disk
    p2_reps: int = 3  # P2 repetitions (each: two runs, 4 tool/mode pairs, both sides)
    workdir_base: Path = field(default=Path("/var/tmp"))
    #: P1/P3's QEMU builds (kvmsnap_demo/qemu_builds.py), forked side by side; P4's in turn
    qemu: tuple[str, ...] = ("7.2", "10.0")

    @classmethod
    def make(cls, quick: bool, out: Path, only: Iterable[str], reps: int | None = None,
             ram_mib: Sequence[int] | None = None,
             qemu: Sequence[str] | None = None) -> Settings:
        if quick:
            defaults: dict[str, Any] = dict(reps=1, ram_mib=(256,), baseline_s=1.0,
                                            settle_s=0.5, warmup=False, write_mib=(0, 64),
                                            p2_disk_mib=512, p2_reps=1)
        else:
            defaults = dict(reps=6, ram_mib=(256, 1024, 2048), baseline_s=2.0, settle_s=1.0,
                            warmup=True, write_mib=(0, 16, 64, 256, 1024),
                            p2_disk_mib=2048, p2_reps=3)
        if reps is not None:
            defaults["reps"] = reps
            defaults["p2_reps"] = reps
        if ram_mib:
            defaults["ram_mib"] = tuple(ram_mib)
        if qemu:
            defaults["qemu"] = tuple(qemu)
        return cls(quick=quick, out=out, only=frozenset(only), fill_ratio=0.7, **defaults)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["only"] = sorted(self.only)
        data["workdir_base"] = str(self.workdir_base)
        return data


# -- the machine ---------------------------------------------------------------------------
def machine_info(accel: str, accel_why: str) -> dict[str, Any]:
    """CPU, cores, memory, kernel, accelerator and QEMU: recorded with every result."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    meminfo = {line.split(":")[0]: line.split(":")[1].strip()
               for line in _read("/proc/meminfo").splitlines() if ":" in line}
    mem_kib = int(meminfo.get("MemTotal", "0 kB").split()[0])
    uffd_ok, uffd_why = probes.uffd_wp_supported()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "virtualised_host": "hypervisor" in flags,
        "kernel": platform.release(),
        "os": _os_release(),
        "accelerator": accel,
        "accelerator_why": accel_why,
        "qemu_version": ".".join(map(str, probes.qemu_version())),
        "userfaultfd_wp": uffd_ok,
        "userfaultfd_wp_why": uffd_why,
        "python": platform.python_version(),
        "kvmsnap_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB "
            f"RAM{' (a VM itself)' if machine['virtualised_host'] else ''}; Linux "
            f"{machine['kernel']}; QEMU {machine['qemu_version']}, accelerator "
            f"{machine['accelerator'].upper()} ({machine['accelerator_why']})")


def load_snapshot() -> dict[str, Any]:
    """How busy the host is right now: load average and QEMU processes not started by us."""
    mine = os.getpid()
    others = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if not comm.startswith("qemu-system"):
                continue
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid != mine:
            others += 1
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "other_qemu": others}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _os_release() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+local-changes" if dirty.stdout.strip() else "")


# -- statistics ----------------------------------------------------------------------------
def summary(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Median and spread (min, quartiles, max) of the values that exist."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None}
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {"n": len(data), "median": statistics.median(data), "min": data[0],
            "max": data[-1], "q1": q1, "q3": q3}


def percentile(data: Sequence[float], pct: float) -> float | None:
    if not data:
        return None
    ordered = sorted(data)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_summary(stats: dict[str, Any], digits: int = 1, scale: float = 1.0) -> str:
    """``median [min-max]`` for a table cell."""
    if not stats or not stats.get("n"):
        return "-"
    med, low, high = (stats[k] * scale for k in ("median", "min", "max"))
    if stats["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


# -- output --------------------------------------------------------------------------------
def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.rename(path)


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short private directory for unix sockets (paths are limited to 107 bytes)."""
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="kvmsnap-bench-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
