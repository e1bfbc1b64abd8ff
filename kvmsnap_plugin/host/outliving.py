"""Helper processes that must outlive kvmsnap: the RAM state writer and the watchdog.

Both protect the parent if kvmsnap dies: the writer keeps absorbing QEMU's RAM stream (a
failed background-snapshot write hangs QEMU 7.2), the watchdog resumes a VM kvmsnap paused.
They run in sessions of their own, and under a systemd service in scopes of their own.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.host import process

log = logging.getLogger(__name__)


def under_systemd_service() -> bool:
    """Is kvmsnap a process of a systemd unit (systemd sets INVOCATION_ID for them)?"""
    return bool(os.environ.get("INVOCATION_ID")) and Path("/run/systemd/system").is_dir()


def launchers() -> list[list[str]]:
    """Prefixes to start a helper that must outlive kvmsnap with, best first.

    A systemd service's processes all die with it: when kvmsnap (its main process) is
    killed, systemd SIGKILLs the rest of the unit at once (KillMode=mixed), the RAM state
    writer and the watchdog too. Under systemd they therefore run in a transient scope of
    their own (``systemd-run --scope`` execs the command in place: same PID, same file
    descriptors); if that fails, as plain children.
    """
    systemd_run = shutil.which("systemd-run")
    if under_systemd_service() and systemd_run:
        return [[systemd_run, "--scope", "--quiet", "--collect",
                 "--description=kvmsnap helper (outlives kvmsnap to protect the VM)"], []]
    return [[]]


def spawn_ready(argv: Sequence[str | os.PathLike[str]], what: str, *, timeout: float = 30.0,
                pass_fds: Sequence[int] = (), **options: Any) -> subprocess.Popen[bytes] | None:
    """Start a helper that must outlive kvmsnap (:func:`launchers`) and wait until it runs:
    the helper gets a descriptor as its last argument and writes ``1`` to it when ready, so
    its interpreter start-up never overlaps the guest's pause. None if no launcher got it
    running (the caller says why, from the helper's own stderr)."""
    for prefix in launchers():
        ready_r, ready_w = os.pipe()
        try:
            proc = process.spawn([*prefix, *argv, str(ready_w)], pass_fds=(*pass_fds, ready_w),
                         **options)
        finally:
            os.close(ready_w)
        try:
            readable, _, _ = select.select([ready_r], [], [], timeout)
            if readable and os.read(ready_r, 1) == b"1":
                return proc
        finally:
            os.close(ready_r)
        process.end(proc, grace=1)
        if prefix:
            log.warning("%s did not start in a scope of its own; starting it without one",
                        what)
    return None
