"""The clone: planned from the parent, started from the fork's RAM image, NICs unplugged.

The clone runs the parent's command line rewritten by :mod:`kvmsnap_plugin.vm.clone_argv`
(disks on throw-away overlays, network isolated, chardevs null, a private QMP socket). It
starts paused, loads the RAM state through an fd, and has its NIC links set down before the
guest runs, so the guest sees its cable unplugged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.host.resources import (
    CloneMemory,
    SpaceNeed,
    check_clone_memory,
    check_space,
    check_workdir,
    default_huge_page_size,
    hugetlbfs_page_size,
    make_oom_victim,
    parse_size,
)
from kvmsnap_plugin.model import (
    CloneDisk,
    ClonePlan,
    ForkOptions,
    Label,
    OnUnclean,
    Parent,
    ParentDisk,
    ShutdownResult,
)
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.vm.clone_argv import agent_chardev_ids, rewrite_argv
from kvmsnap_plugin.vm.clone_options import policy_of
from kvmsnap_plugin.vm.confine import clone_binary, clone_env, parents_binary
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.parent import option_fields
from kvmsnap_plugin.vm.qemu_args import parse_argv
from kvmsnap_plugin.vm.qmp import (
    Monitor,
    file_migration_supported,
    hand_state_fd,
    release_state_fd,
)

log = logging.getLogger(__name__)

STATE_FD_NAME = "kvmsnap-incoming"


def plan_clone(parent: Parent, workdir: Path, sockets: Path,
               console_log: Path | None = None, monitor: Monitor | None = None) -> ClonePlan:
    """The clone's command line, disks and binary (nothing is created). ``monitor``, the
    parent's, tells whether its binary has QEMU's sandbox."""
    if parent.offline:
        raise VMError(f"{parent.name} is shut off: there is nothing to clone",
                      "its disk images are consistent as they are: back them up directly")
    disks = tuple(CloneDisk(d.device, workdir / f"clone-{safe_name(d.device)}.qcow2",
                            Path(d.filename), d.format) for d in parent.writable_disks)
    qmp_path = sockets / "clone-qmp.sock"
    agent = sockets / "clone-qga.sock" if agent_chardev_ids(list(parent.argv)) else None
    argv = rewrite_argv(list(parent.argv), parent.writable_disks, disks, qmp_path, console_log,
                        workdir=workdir, agent_socket=agent, policy=policy_of(parent))
    binary = clone_binary(parent, monitor)
    if binary.sandbox:  # the clone's own: the parent's -sandbox is never copied
        argv += ["-sandbox", binary.sandbox]
    return ClonePlan(tuple(argv), disks, workdir, qmp_path, console_log, agent, binary)


def prepare_overlays(plan: ClonePlan, disks: Sequence[ParentDisk]) -> None:
    """Create the clone's overlays; the frozen images need not be frozen yet (``-u``)."""
    for clone_disk, disk in zip(plan.disks, disks, strict=True):
        create_overlay(clone_disk.overlay, disk.filename, disk.format, disk.virtual_size)


# -- the clone's memory ---------------------------------------------------------------------
# What each memory backend means for a second copy of the guest's RAM:
# - ordinary RAM (memory-backend-ram, -m): the clone needs as much again, from MemAvailable.
# - huge pages (memory-backend-file on hugetlbfs, memory-backend-memfd hugetlb=on): they
#   come from a fixed pool, not from MemAvailable; the clone needs as many free pages again,
#   checked against the pool. (Legacy -mem-path and share=on are refused with the parent.)
# - prealloc: the clone commits all of its RAM as it starts instead of as the state loads;
#   the check already asks for all of it, so it only comes sooner: allowed.
# - mem-lock / mlock: the clone locks a second copy that can be neither swapped nor
#   reclaimed. Root may lock it (the memory check stands); anyone else only within
#   RLIMIT_MEMLOCK: refused above it, since QEMU would fail to start.
def clone_memory(parent: Parent, monitor: Monitor) -> CloneMemory:
    """What a clone of ``parent`` takes: its RAM as QEMU reports it, and how it is backed."""
    summary = monitor.execute("query-memory-size-summary")
    ram = int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory") or 0)
    huge: dict[int, int] = {}
    locked = False
    for option in parse_argv(list(parent.argv))[1]:
        value = option.value or ""
        if option.name == "object":
            fields = option_fields(value, "qom-type")
            page_size = _huge_page_size(fields, parent.pid)
            if page_size:
                huge[page_size] = huge.get(page_size, 0) + parse_size(fields.get("size", 0))
        elif option.name in ("overcommit", "realtime"):
            fields = option_fields(value, "")
            # on, yes, true, or (QEMU 9) on-fault: the clone locks what it loads
            locked = locked or any(fields.get(key, "off") not in ("off", "no", "false")
                                   for key in ("mem-lock", "mlock"))
    return CloneMemory(ram, huge, locked)


def check_room(parent: Parent, monitor: Monitor, options: ForkOptions,
               overlay_dirs: Iterable[Path]) -> None:
    """Before the pause, refuse (HostError) a run that cannot fit: the RAM state and the
    clone's overlays in the work directory, the parent's overlays, the clone's memory."""
    check_workdir(options.workdir, options.allow_remote_workdir)
    memory = clone_memory(parent, monitor)
    check_space([SpaceNeed(options.workdir, memory.ram, "the RAM state (the guest's RAM) "
                           "and the clone's overlays", "--workdir"),
                 *(SpaceNeed(d, 0, "the parent's overlays", "--overlay-dir")
                   for d in sorted(overlay_dirs))], options.min_free)
    check_clone_memory(memory)


def _huge_page_size(fields: dict[str, str], pid: int) -> int | None:
    kind = fields.get("qom-type", "")
    if kind == "memory-backend-memfd" and fields.get("hugetlb") in ("on", "true", "yes"):
        size = fields.get("hugetlbsize")
        return parse_size(size) if size else default_huge_page_size()
    if kind == "memory-backend-file" and fields.get("mem-path"):
        return hugetlbfs_page_size(fields["mem-path"], pid)
    return None


class Clone(Machine):
    """A running clone: loaded from the RAM state, NICs unplugged, still paused.

    The OOM killer's first choice from its first instant: if memory runs out while it
    runs, the kernel ends the clone (the backup fails) and never the parent. It runs the
    parent's own binary with a clean environment (see :mod:`~kvmsnap_plugin.vm.confine`).
    """

    def __init__(self, plan: ClonePlan, on_start: Callable[[int], None] | None) -> None:
        def started(pid: int) -> None:
            make_oom_victim(pid)  # before it loads a byte of the guest's RAM
            if on_start:
                on_start(pid)

        super().__init__(plan.argv, qmp_path=plan.qmp_path, name="clone",
                         console_log=plan.console_log,
                         stderr_log=plan.workdir / "clone.stderr", on_start=started,
                         env=clone_env(plan.binary))
        self.plan = plan
        self.restore_s = 0.0

    def __exit__(self, *exc: object) -> None:
        """A clone still up here is one a failed or interrupted run leaves: its disks are
        thrown away, so it is quit at once; a power button its guest may ignore would only
        hold the run's end up for 20 s (a SIGTERM'd kvmsnap too)."""
        self.shutdown(powerdown_timeout=0, quit_timeout=10)

    def _spawn(self, stderr: IO[bytes], executable: str | None = None) -> subprocess.Popen[bytes]:
        if self.plan.binary is None:
            raise VMError("the clone has no binary planned", "plan it with plan_clone")
        with parents_binary(self.plan.binary, self.plan.workdir) as parents:
            return super()._spawn(stderr, parents)


@contextlib.contextmanager
def running_clone(plan: ClonePlan, state_file: Path, timeout: float = 300.0,
                  on_start: Callable[[int], None] | None = None) -> Iterator[Clone]:
    """Start the clone from the RAM state file; the file is deleted once loaded.

    The clone is paused on entry (``-S``): the caller runs it and presses its power button.
    On exit it is always ended (soft, then hard). ``on_start`` learns its PID at once.
    """
    clone = Clone(plan, on_start)
    try:
        with clone:
            started = time.monotonic()
            _load_state(clone, state_file, timeout)
            clone.restore_s = time.monotonic() - started
            _unplug_nics(clone)
            yield clone
    finally:
        state_file.unlink(missing_ok=True)


def _load_state(clone: Clone, state_file: Path, timeout: float) -> None:
    fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        channel = hand_state_fd(clone.qmp, fd, STATE_FD_NAME,
                                file_uris=file_migration_supported(clone.qmp))
    finally:
        os.close(fd)
    try:
        clone.qmp.execute("migrate-incoming", {"uri": channel.uri})
        faults.point("clone-loading")
        _wait_loaded(clone, timeout)
    finally:  # else QEMU holds the deleted file's space for the clone's whole run
        release_state_fd(clone.qmp, channel)
    # The state holds the guest's secrets: gone as soon as it is loaded.
    state_file.unlink(missing_ok=True)
    log.info("clone restored from the fork's RAM image")


def _wait_loaded(clone: Clone, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = clone.qmp.execute("query-migrate").get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or not clone.running():
            raise VMError(f"the clone could not load the RAM state ({status}): "
                          f"{clone.stderr_tail()}",
                          "the VM's devices changed since it started (hot-plug?); "
                          "back it up offline")
        if time.monotonic() > deadline:
            raise VMError(f"the clone did not load its RAM within {timeout:g} s")
        time.sleep(0.02)


def nic_names(clone: Machine) -> list[str]:
    """Names of the clone's NICs, from ``info network`` (all NIC models, not only virtio)."""
    text = clone.qmp.hmp("info network")
    return re.findall(r"^\s*\\?\s*(\S+): index=\d+,type=nic", text, re.MULTILINE)


def _unplug_nics(clone: Clone) -> None:
    for name in nic_names(clone):
        clone.qmp.execute("set_link", {"name": name, "up": False})
        log.debug("clone NIC %s: link down", name)


# -- what the clone leaves ----------------------------------------------------------------
def label_of(result: ShutdownResult, on_unclean: OnUnclean) -> Label:
    """What the archived disks will be, from how the clone ended (or raise, by policy)."""
    if result.clean:
        return Label.CLEAN
    if on_unclean is OnUnclean.CRASH_CONSISTENT:
        log.warning("the clone did not shut down cleanly (%s): using the crash-consistent "
                    "images of the fork instant, labelled as such", result.reason)
        return Label.CRASH_CONSISTENT
    raise VMError(f"the clone did not shut down cleanly ({result.reason}); nothing was "
                  "archived or kept",
                  "raise --shutdown-timeout, check the guest handles the ACPI power button, "
                  "or accept --on-unclean crash-consistent")


def images_to_archive(clone_plan: ClonePlan, label: Label) -> list[tuple[str, Path, str]]:
    """(device, image, format): the clone's disks (qcow2 overlays kvmsnap made), or the
    frozen (crash-consistent) images, in their own format, for a labelled fallback."""
    if label is Label.CLEAN:
        return [(d.device, d.overlay, "qcow2") for d in clone_plan.disks]
    return [(d.device, d.frozen, d.frozen_format) for d in clone_plan.disks]
