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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import faults
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import CloneDisk, ClonePlan, Parent, ParentDisk
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.vm.clone_argv import agent_chardev_ids, rewrite_argv
from kvmsnap_plugin.vm.machine import Machine

log = logging.getLogger(__name__)

STATE_FD_NAME = "kvmsnap-incoming"


def plan_clone(parent: Parent, workdir: Path, sockets: Path,
               console_log: Path | None = None) -> ClonePlan:
    """The clone's command line and disks (pure: nothing is created)."""
    if parent.offline:
        raise VMError(f"{parent.name} is shut off: there is nothing to clone",
                      "its disk images are consistent as they are: back them up directly")
    disks = tuple(CloneDisk(d.device, workdir / f"clone-{safe_name(d.device)}.qcow2",
                            Path(d.filename), d.format) for d in parent.writable_disks)
    qmp_path = sockets / "clone-qmp.sock"
    agent = sockets / "clone-qga.sock" if agent_chardev_ids(list(parent.argv)) else None
    argv = rewrite_argv(list(parent.argv), parent.writable_disks, disks, qmp_path, console_log,
                        workdir=workdir, agent_socket=agent)
    return ClonePlan(tuple(argv), disks, workdir, qmp_path, console_log, agent)


def prepare_overlays(plan: ClonePlan, disks: Sequence[ParentDisk]) -> None:
    """Create the clone's overlays; the frozen images need not be frozen yet (``-u``)."""
    for clone_disk, disk in zip(plan.disks, disks, strict=True):
        create_overlay(clone_disk.overlay, disk.filename, disk.format, disk.virtual_size)


class Clone(Machine):
    """A running clone: loaded from the RAM state, NICs unplugged, still paused."""

    def __init__(self, plan: ClonePlan, on_start: Callable[[int], None] | None) -> None:
        super().__init__(plan.argv, qmp_path=plan.qmp_path, name="clone",
                         console_log=plan.console_log,
                         stderr_log=plan.workdir / "clone.stderr", on_start=on_start)
        self.plan = plan
        self.restore_s = 0.0


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
        clone.qmp.send_fd(fd, STATE_FD_NAME)
    finally:
        os.close(fd)
    clone.qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
    faults.point("clone-loading")
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
    # The state holds the guest's secrets: gone as soon as it is loaded.
    state_file.unlink(missing_ok=True)
    log.info("clone restored from the fork's RAM image")


def nic_names(clone: Machine) -> list[str]:
    """Names of the clone's NICs, from ``info network`` (all NIC models, not only virtio)."""
    text = clone.qmp.hmp("info network")
    return re.findall(r"^\s*\\?\s*(\S+): index=\d+,type=nic", text, re.MULTILINE)


def _unplug_nics(clone: Clone) -> None:
    for name in nic_names(clone):
        clone.qmp.execute("set_link", {"name": name, "up": False})
        log.debug("clone NIC %s: link down", name)
