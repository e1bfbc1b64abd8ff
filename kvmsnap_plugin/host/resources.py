"""What the host has room for: free space where a run writes, and memory for the clone.

Both are checked before the parent is paused, so a run that cannot fit is refused while
the VM runs on untouched. A run writes in two kinds of places: the work directory (the
guest's RAM state, about its RAM size, and the clone's overlays) and where the parent's
overlays go (``--overlay-dir``, or beside each image). Only the RAM state's size is known
in advance; the overlays grow with what the guest (and, briefly, the clone) writes, so each
filesystem must also keep a margin free (``min_free``). A parent whose overlay fills its
filesystem stops on an I/O error; a full work directory fails the RAM state.

The clone is a second copy of the guest's RAM. It must fit in what the kernel can give
without swapping the parent out (``MemAvailable``), huge pages come from their own pool,
and the clone is made the OOM killer's first choice, so that if memory runs out after all,
the kernel kills the clone and never the parent.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvmsnap_plugin.errors import HostError, UsageError
from kvmsnap_plugin.host import dirs, mounts
from kvmsnap_plugin.paths import DEFAULT_WORKDIR, safe_name

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
HUGEPAGES = Path("/sys/kernel/mm/hugepages")
#: what the clone's QEMU takes beyond the guest's RAM: its code, device state, I/O buffers
#: and, under TCG, the translation cache (QEMU 7.2 reserves up to 1 GiB of it but touches
#: only what the guest's code needs: a few tens of MiB for a Linux guest booting)
QEMU_OVERHEAD = 256 << 20
#: the OOM killer's score adjustment for the clone: the highest, so it is killed first
CLONE_OOM_SCORE_ADJ = 1000

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
          "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from ``1073741824``, ``"1G"``, ``"512M"``, ``"1.5GiB"`` (binary units, as QEMU)."""
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a size, not {value!r}", 'e.g. "1G" or "512M"')
    if isinstance(value, int | float) and value >= 0:
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise UsageError(f"{what} must be a size such as 1G, 512M or a number of bytes, "
                         f"not {value!r}", 'e.g. "1G" or "512M"')
    return int(float(match[1]) * _UNITS[match[2].upper()])


def human(size: int) -> str:
    """``1.5 GiB``, ``256 MiB``, ``12 KiB``, ``100 B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20),
                        ("KiB", 1 << 10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


# -- space ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpaceNeed:
    """What a run will write into one directory (which need not exist yet)."""

    directory: Path
    bytes: int  # known in advance (the RAM state); the margin comes on top
    what: str  # for people: "the RAM state (the guest's RAM) and the clone's overlays"
    option: str  # the option that moves it elsewhere: "--workdir"


def existing_ancestor(directory: Path) -> Path:
    """``directory`` or its nearest ancestor that exists: where it would be created."""
    path = directory.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer can still use on ``directory``'s filesystem."""
    stats = os.statvfs(existing_ancestor(directory))
    return stats.f_bavail * stats.f_frsize


def check_space(needs: Iterable[SpaceNeed], margin: int) -> None:
    """Refuse (HostError) when a filesystem cannot take what goes there plus ``margin``.

    Needs on one filesystem add up (the work directory and the overlays often share one),
    and the margin counts once per filesystem.
    """
    by_filesystem: dict[int, list[SpaceNeed]] = {}
    for need in needs:
        device = existing_ancestor(need.directory).stat().st_dev
        by_filesystem.setdefault(device, []).append(need)
    for group in by_filesystem.values():
        stats = os.statvfs(existing_ancestor(group[0].directory))
        if not stats.f_blocks:  # no size to measure (procfs, some FUSE): writing will tell
            continue
        free, known = stats.f_bavail * stats.f_frsize, sum(need.bytes for need in group)
        if free < known + margin:
            raise HostError(_space_message(group, free, known, margin),
                            _space_fix(group))


def _space_message(group: list[SpaceNeed], free: int, known: int, margin: int) -> str:
    where = ", ".join(sorted({str(need.directory) for need in group}))
    what = " and ".join(need.what for need in group)
    needed = f"{human(known)} + the {human(margin)} margin" if known else \
        f"the {human(margin)} margin"
    return (f"not enough free space in {where} for {what}: {human(free)} free, "
            f"{human(known + margin)} needed ({needed}); the VM was not paused")


def _space_fix(group: list[SpaceNeed]) -> str:
    options = " or ".join(sorted({need.option for need in group}))
    return (f"free space there, pass {options} on a filesystem with room, or lower the "
            "margin with --min-free (min_free)")


def workdir_base(base: Path, *, create: bool = True) -> Path:
    """The work directory, created or checked (dirs.py): kvmsnap's own default must be
    0700, one the user names writable by nobody else."""
    if base == DEFAULT_WORKDIR:
        return dirs.private_dir(base, "the work directory", create=create)
    return dirs.user_dir(base, "the work directory", create=create)


def check_workdir(base: Path, allow_remote: bool) -> None:
    """Before the pause: the work directory is safe, and on a filesystem of this host, since
    the guest's RAM (its keys included) goes there, unless the user allows otherwise.
    Nothing is made yet (make_workdir does, after every check)."""
    workdir_base(base, create=False)
    fstype = mounts.filesystem_type(base)
    if mounts.is_remote(fstype) and not allow_remote:
        raise HostError(f"the work directory {base} is on a {fstype} filesystem: the guest's "
                        "RAM, keys included, would leave this host or pass through a "
                        "user-space daemon; the VM was not paused",
                        "pass a --workdir on a local filesystem, or --allow-remote-workdir "
                        "(allow_remote_workdir = true) if that is acceptable")


def make_workdir(base: Path, name: str) -> Path:
    """A private (0700) directory for one run of VM ``name``: it will hold the guest's RAM."""
    base = workdir_base(base)
    try:
        return Path(tempfile.mkdtemp(prefix=f"run-{safe_name(name)[:40]}-", dir=base))
    except OSError as exc:
        raise HostError(f"cannot create a work directory in {base}: {exc.strerror}",
                        "pass a writable --workdir with room for the VM's RAM") from None


# -- memory ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloneMemory:
    """What a clone of the guest takes: its RAM, in ordinary and in huge pages."""

    ram: int  # all of the guest's RAM (bytes)
    huge: dict[int, int] = field(default_factory=dict)  # page size -> bytes in huge pages
    locked: bool = False  # the clone locks its RAM (-overcommit mem-lock, -realtime mlock)

    @property
    def ordinary(self) -> int:
        return max(0, self.ram - sum(self.huge.values()))


def meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (page counts such as HugePages_Free as they are)."""
    values = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def available_memory(path: Path = MEMINFO) -> int:
    """What the kernel can give without swapping (``MemAvailable``), in bytes."""
    return meminfo(path).get("MemAvailable", 0)


def default_huge_page_size(path: Path = MEMINFO) -> int:
    return meminfo(path).get("Hugepagesize", 2 << 20)


def free_huge_pages(page_size: int, root: Path = HUGEPAGES) -> int:
    """Huge pages of ``page_size`` nobody has yet: free, less those already promised."""
    directory = root / f"hugepages-{page_size >> 10}kB"
    try:
        free = int((directory / "free_hugepages").read_text())
        reserved = int((directory / "resv_hugepages").read_text())
    except (OSError, ValueError):
        return 0  # the kernel has no pool of that size
    return max(0, free - reserved)


def check_clone_memory(need: CloneMemory, *, meminfo_path: Path = MEMINFO,
                       hugepages_root: Path = HUGEPAGES) -> None:
    """Refuse (HostError) a clone the host cannot hold next to the parent."""
    available = available_memory(meminfo_path)
    wanted = need.ordinary + QEMU_OVERHEAD
    if available < wanted:
        raise HostError(
            f"not enough memory for the clone: {human(available)} available "
            f"(MemAvailable), {human(wanted)} needed (the guest's RAM, "
            f"{human(need.ordinary)}, + {human(QEMU_OVERHEAD)} for QEMU); the VM was not "
            "paused", "free memory on the host (stop other VMs or services), or back the "
            "VM up while it is shut off")
    for size, wanted_bytes in sorted(need.huge.items()):
        pages, free = math.ceil(wanted_bytes / size), free_huge_pages(size, hugepages_root)
        if free < pages:
            raise HostError(
                f"not enough free {human(size)} huge pages for the clone: {free} free, "
                f"{pages} needed (the guest's RAM in huge pages); the VM was not paused",
                f"add {pages - free} to {hugepages_root}/hugepages-{size >> 10}kB/"
                "nr_hugepages, or back the VM up while it is shut off")
    if need.locked:
        _check_lock_limit(need.ram)


def _check_lock_limit(ram: int) -> None:
    """A clone of a VM that locks its RAM locks a second copy: root may (CAP_IPC_LOCK);
    anyone else only up to RLIMIT_MEMLOCK, which the clone inherits from kvmsnap."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= ram:
        return
    raise HostError(f"the VM locks its RAM (mem-lock) and its clone would lock a second "
                    f"{human(ram)}, above this process's locked-memory limit "
                    f"({human(soft)}); the VM was not paused",
                    "run kvmsnap as root, or raise the limit (`ulimit -l`, LimitMEMLOCK=)")


def hugetlbfs_page_size(path: str, pid: int | None = None) -> int | None:
    """The huge page size of the hugetlbfs ``path`` lives on (as process ``pid`` sees its
    mounts: libvirt runs QEMU in a mount namespace of its own), or None if it is not on
    hugetlbfs."""
    table = Path(f"/proc/{pid}/mounts" if pid else "/proc/self/mounts")
    try:
        lines = table.read_text().splitlines()
    except OSError:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    best: tuple[int, str, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        mountpoint = parts[1].replace("\\040", " ")
        inside = path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/")
        if inside and (best is None or len(mountpoint) > best[0]):
            best = (len(mountpoint), parts[2], parts[3])
    if best is None or best[1] != "hugetlbfs":
        return None
    options = dict(o.partition("=")[::2] for o in best[2].split(","))
    return parse_size(options["pagesize"]) if options.get("pagesize") else \
        default_huge_page_size()


def make_oom_victim(pid: int) -> None:
    """Make ``pid`` the OOM killer's first choice (raising the score needs no privilege)."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(f"{CLONE_OOM_SCORE_ADJ}\n")
    except OSError as exc:  # it exited already: its own error will tell
        log.warning("could not make process %s the first the OOM killer ends: %s", pid, exc)
