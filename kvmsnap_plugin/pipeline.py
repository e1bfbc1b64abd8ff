"""The pipeline: fork -> clone -> shutdown -> expose -> (archive) -> verify -> cleanup.

Each step is a module; data flows one way through small frozen dataclasses. Cleanup is an
ExitStack filled as resources come into being, so it always runs, in reverse: whatever read
the clone's disks has finished before the parent's overlays are committed back into the
frozen images they are built on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmsnap_plugin import verify
from kvmsnap_plugin.chain import Commit, commit_back, keep_images
from kvmsnap_plugin.clone import plan_clone, prepare_overlays, running_clone
from kvmsnap_plugin.errors import HostError, VMError
from kvmsnap_plugin.expose import Exposure, exposed
from kvmsnap_plugin.fork import ForkPoint, take_fork
from kvmsnap_plugin.machine import socket_dir
from kvmsnap_plugin.parent import Parent, discover
from kvmsnap_plugin.qmp import QmpSession, peer_pid
from kvmsnap_plugin.shutdown import ShutdownPolicy, ShutdownResult, shut_down

log = logging.getLogger("kvmsnap")

CLEAN = "clean"
CRASH_CONSISTENT = "crash-consistent"
DEFAULT_WORKDIR = Path("/var/tmp/kvmsnap")


@dataclass(frozen=True)
class ForkOptions:
    method: str = "auto"  # "auto", "background-snapshot" or "stop-and-copy"
    shutdown: ShutdownPolicy = field(default_factory=ShutdownPolicy)
    keep_dir: Path | None = None  # write the clone's disks out as standalone images here
    workdir: Path = DEFAULT_WORKDIR  # RAM state, clone overlays, mounts (0700)
    overlay_dir: Path | None = None  # the parent's temporary overlays (default: beside images)
    clone_console: Path | None = None  # capture the clone's first serial port (debugging)
    pid: int | None = None  # the QEMU process, if peer credentials cannot tell


@dataclass(frozen=True)
class ForkResult:
    vm: str
    label: str  # "clean", or "crash-consistent" for a labelled fallback
    method: str
    pause_ms: float
    disk_snapshot_ms: float
    ram_bytes: int
    ram_save_s: float
    qemu_downtime_ms: int | None
    clone_restore_s: float
    shutdown: ShutdownResult
    verdicts: list[verify.Verdict]
    kept: list[str]
    commits: list[Commit]
    total_s: float

    @property
    def clean(self) -> bool:
        return self.label == CLEAN and all(v.clean for v in self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        return data


#: called with the exposed disks while they are readable (archivers work here)
OnExposed = Callable[[Parent, ForkPoint, Exposure, str], None]


def fork_vm(qmp_socket: Path, options: ForkOptions = ForkOptions(),
            on_exposed: OnExposed | None = None) -> ForkResult:
    """Fork the VM behind ``qmp_socket`` and return its cleanly shut-down disks' verdicts."""
    started = time.monotonic()
    pid = options.pid or peer_pid(qmp_socket)
    commits: list[Commit] = []
    with contextlib.ExitStack() as cleanup:
        session = cleanup.enter_context(QmpSession(qmp_socket, name="parent"))
        session.connect()
        parent = discover(session, qmp_socket, pid)
        run_id = f"{os.getpid()}-{int(time.time())}"
        workdir = _make_workdir(options.workdir, parent.name)
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        sockets = cleanup.enter_context(socket_dir())
        plan = plan_clone(parent, workdir, sockets, options.clone_console)
        prepare_overlays(plan, parent.writable_disks)
        point = take_fork(session, parent, workdir / "ram.state", run_id=run_id,
                          method=options.method, overlay_dir=options.overlay_dir)
        cleanup.callback(lambda: commits.extend(commit_back(session, point.disks)))
        with running_clone(plan, point.state_file) as clone:
            restore_s = clone.restore_s
            stopped = shut_down(clone, options.shutdown)
        label = _label(stopped, options.shutdown)
        images = ([(d.device, d.overlay) for d in plan.disks] if label == CLEAN else
                  [(d.device, d.frozen) for d in plan.disks])
        with exposed(images, workdir) as exposure:
            verdicts = verify.verdicts(exposure.filesystems)
            if on_exposed:
                on_exposed(parent, point, exposure, label)
        kept = ([str(p) for p in keep_images(images, options.keep_dir)]
                if options.keep_dir else [])
    return ForkResult(parent.name, label, point.method, point.pause_ms, point.disk_snapshot_ms,
                      point.ram_bytes, point.ram_save_s, point.qemu_downtime_ms, restore_s,
                      stopped, verdicts, kept, commits, time.monotonic() - started)


def _label(stopped: ShutdownResult, policy: ShutdownPolicy) -> str:
    if stopped.clean:
        return CLEAN
    if policy.on_unclean == "crash-consistent":
        log.warning("the clone did not shut down cleanly (%s): using the crash-consistent "
                    "images of the fork instant, labelled as such", stopped.reason)
        return CRASH_CONSISTENT
    raise VMError(f"the clone did not shut down cleanly ({stopped.reason}); nothing was kept",
                  "raise --shutdown-timeout, check the guest handles the ACPI power button, "
                  "or accept --on-unclean crash-consistent")


def _make_workdir(base: Path, vm_name: str) -> Path:
    """A private (0700) directory for this run: it will hold the guest's RAM."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in vm_name)[:40]
        return Path(tempfile.mkdtemp(prefix=f"kvmsnap-{safe}-", dir=base))
    except OSError as exc:
        raise HostError(f"cannot create a work directory in {base}: {exc.strerror}",
                        "pass a writable --workdir with room for the VM's RAM") from None
