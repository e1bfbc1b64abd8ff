"""The RAM snapshot: a QEMU migration into a state file, and the run state around it.

With ``background-snapshot`` QEMU's migration thread captures the CPU and device state and
write-protects RAM, then streams RAM copy-on-write while the guest runs; without it
(stop-and-copy) the whole RAM is written while the guest is paused. Either way QEMU writes
into a file descriptor kvmsnap hands it: a pipe as ``fd:``, the state file itself as
``file:/dev/fdset/N`` where QEMU has ``file:`` URIs (:func:`~kvmsnap_plugin.vm.qmp.hand_state_fd`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.errors import HostError, KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.host import outliving, probes
from kvmsnap_plugin.model import MIGRATION_FAILED, MIGRATION_UNFINISHED, RamMethod
from kvmsnap_plugin.vm.qmp import (
    Monitor,
    StateChannel,
    file_migration_supported,
    hand_state_fd,
    release_state_fd,
)

log = logging.getLogger(__name__)

STATE_FD_NAME = "kvmsnap-state"
#: what a failed RAM state write tells the user to do
STATE_SPACE_HINT = ("free space in the work directory (it needs about the VM's RAM size), "
                    "or pass --workdir on a larger filesystem")
#: run states in which a parent we paused waits for ``cont``
PAUSED = ("paused", "postmigrate", "finish-migrate")


# -- migration settings ------------------------------------------------------------------------
#: guest RAM a stop-and-copy pause is assumed to save per second, to judge ``max_pause``
#: before pausing. Measured here (TCG, QEMU 7.2, QEMU writing the state file itself): 179 MiB
#: of state in 333 ms, ~540 MiB/s; halved for a guest whose RAM is all in use (zero pages cost
#: next to nothing) and for slower disks, and applied to the whole RAM size.
STOP_AND_COPY_RATE = 256 << 20
#: the migration parameter kvmsnap changes; with the capabilities below, all it touches
MAX_BANDWIDTH = "max-bandwidth"
#: QEMU 9.0+: RAM at fixed file offsets. Off for our snapshots: a background snapshot with
#: it is accepted by QEMU 10 but does not load, and the clone would not expect its format.
MAPPED_RAM = "mapped-ram"


def migration_settings(monitor: Monitor) -> dict[str, Any]:
    """What :func:`configure_migration` changes, as it is now: to be put back afterwards."""
    capabilities = {c["capability"]: c["state"]
                    for c in monitor.execute("query-migrate-capabilities")}
    parameters = monitor.execute("query-migrate-parameters")
    settings = {RamMethod.BACKGROUND.value: bool(capabilities.get(RamMethod.BACKGROUND, False)),
                MAX_BANDWIDTH: parameters.get(MAX_BANDWIDTH)}
    if capabilities.get(MAPPED_RAM):  # only a QEMU that has it; seldom on
        settings[MAPPED_RAM] = True
    return settings


def configure_migration(monitor: Monitor, method: str,
                        settings: dict[str, Any] | None = None) -> str:
    """Set up the RAM snapshot (``settings``: :func:`migration_settings`); returns the
    method that will run."""
    # Unthrottled: the default cap (32 MiB/s) would stretch a stop-and-copy pause to seconds.
    monitor.execute("migrate-set-parameters", {MAX_BANDWIDTH: 1 << 40})
    if settings and settings.get(MAPPED_RAM):
        monitor.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": MAPPED_RAM, "state": False}]})
    if method in (RamMethod.AUTO, RamMethod.BACKGROUND):
        supported, why = probes.uffd_wp_supported()
        if supported:
            try:
                monitor.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": RamMethod.BACKGROUND, "state": True}]})
                return RamMethod.BACKGROUND
            except VMError as exc:
                why = str(exc)
        if method == RamMethod.BACKGROUND:
            raise VMError(f"background snapshot unavailable: {why}",
                          "use --method stop-and-copy (longer pause) or run as root")
        log.warning("background snapshot unavailable (%s); falling back to stop-and-copy, "
                    "the VM will pause for the whole RAM save", why)
    monitor.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": RamMethod.BACKGROUND, "state": False}]})
    return RamMethod.STOP_AND_COPY


def restore_settings(monitor: Monitor, saved: dict[str, Any]) -> bool:
    """Put back what :func:`migration_settings` recorded (background-snapshot off if
    unknown); never raises. True if all of it was put back."""
    restored = True
    changes = [("migrate-set-capabilities", {"capabilities": [
        {"capability": RamMethod.BACKGROUND,
         "state": bool(saved.get(RamMethod.BACKGROUND.value, False))}]})]
    if saved.get(MAX_BANDWIDTH) is not None:
        changes.append(("migrate-set-parameters", {MAX_BANDWIDTH: saved[MAX_BANDWIDTH]}))
    if saved.get(MAPPED_RAM):
        changes.append(("migrate-set-capabilities", {"capabilities": [
            {"capability": MAPPED_RAM, "state": True}]}))
    for command, arguments in changes:
        try:
            monitor.execute(command, arguments)
        except KvmsnapError as exc:
            log.warning("could not put the VM's migration settings back (%s): %s", command, exc)
            restored = False
    return restored


def guest_ram(monitor: Monitor) -> int:
    """The guest's RAM in bytes, hot-plugged memory included."""
    summary = monitor.execute("query-memory-size-summary")
    return int(summary.get("base-memory", 0)) + int(summary.get("plugged-memory") or 0)


def check_pause(monitor: Monitor, method: str, max_pause: float) -> None:
    """Refuse, before the pause, a stop-and-copy snapshot that cannot keep within
    ``max_pause`` seconds: it pauses the guest for the whole RAM save."""
    if method != RamMethod.STOP_AND_COPY:
        return  # background-snapshot pauses for the disk snapshot and the device state only
    size = guest_ram(monitor)
    estimate = size / STOP_AND_COPY_RATE
    if estimate > max_pause:
        raise VMError(f"a stop-and-copy RAM snapshot of {size >> 20} MiB would pause the VM "
                      f"for about {estimate:.1f} s, more than the {max_pause:g} s allowed",
                      f"allow it with --max-pause {math.ceil(estimate)}, or let kvmsnap take "
                      "a background snapshot (run as root on a kernel with userfaultfd "
                      "write-protect)")


# -- where the RAM goes ------------------------------------------------------------------------
class StateSink:
    """Where QEMU's RAM stream goes: ``write_end`` is the fd handed to QEMU, ``channel``
    the URI to migrate to (set by :func:`open_state_fd`)."""

    write_end: int = -1
    channel: StateChannel = StateChannel("")
    monitor: Monitor | None = None

    def handed_over(self) -> None:
        """QEMU has received its own copy of ``write_end``."""

    def finish(self, timeout: float = 600.0) -> None:
        """After the migration completed: all of it is on disk, or raise."""
        raise NotImplementedError

    def close(self) -> None:
        """Our descriptor, and QEMU's copy once the migration is over (file: URIs)."""
        self._close_fd()
        if self.monitor is not None:
            release_state_fd(self.monitor, self.channel)
            self.monitor = None

    def _close_fd(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1


class StateWriter(StateSink):
    """Background-snapshot: the RAM stream goes through kvmsnap's own writer process.

    QEMU writes into a pipe; :mod:`kvmsnap_plugin.fork.statewriter` (a process of its own) copies
    it into the state file (0600, in a 0700 directory). A full disk then fails the backup,
    never QEMU (QEMU 7.2 hangs when a background snapshot's own write fails), and the writer
    outlives a kvmsnap that is killed mid-snapshot. The guest runs meanwhile: the pipe's
    extra copy costs no pause.
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self._errors = state_file.with_name("statewriter.stderr")
        read_end, self.write_end = os.pipe()
        with contextlib.suppress(OSError):  # fewer, larger transfers
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        out = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(self._errors, "wb") as err:
                proc = outliving.spawn_ready(
                    [sys.executable, "-m", "kvmsnap_plugin.fork.statewriter"],
                    "the RAM state writer", stdin=read_end, stdout=out, stderr=err)
        finally:
            for fd in (read_end, out):
                os.close(fd)
        if proc is None:
            self.close()
            reason = self._errors.read_text(errors="replace").strip()
            raise HostError(f"the RAM state writer did not start: {reason or 'no answer'}",
                            "run `kvmsnap doctor`; rerun with --debug")
        self._proc = proc

    def handed_over(self) -> None:
        """QEMU has its own copy of the write end: ours must go, or EOF never comes."""
        self._close_fd()

    def finish(self, timeout: float = 600.0) -> None:
        """After the migration completed: all of it is on disk, or raise."""
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StepTimeout(f"writing the RAM state took more than {timeout:g} s") from None
        if code != 0:
            reason = self._errors.read_text(errors="replace").strip() or f"exit code {code}"
            raise HostError(f"cannot write the RAM state to {self.state_file.parent}: "
                            f"{reason}", STATE_SPACE_HINT)


class StateFile(StateSink):
    """Stop-and-copy: QEMU writes the RAM state into the file (0600) itself.

    The whole RAM is written while the guest is paused, and through the writer's pipe that
    pause was three times longer (333 vs 112 ms for 179 MiB of guest RAM, measured side by
    side). Safe here, unlike background-snapshot: a failed write (ENOSPC) fails this
    migration cleanly and kvmsnap resumes the guest (measured with QEMU 7.2).
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.write_end = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)

    def handed_over(self) -> None:
        """Ours stays open: :meth:`finish` flushes through it."""

    def finish(self, timeout: float = 600.0) -> None:
        """After the migration completed: all of it is on disk, or raise."""
        try:
            os.fsync(self.write_end)
        except OSError as exc:
            raise HostError(f"cannot write the RAM state to {self.state_file.parent}: "
                            f"{exc.strerror}", STATE_SPACE_HINT) from None
        finally:
            self._close_fd()


def open_state_fd(monitor: Monitor, state_file: Path, method: str) -> StateSink:
    """Create the RAM state file and hand QEMU the fd that leads to it (before the pause:
    the probe for ``file:`` URIs reads QEMU's schema)."""
    stop_and_copy = method == RamMethod.STOP_AND_COPY
    file_uris = stop_and_copy and file_migration_supported(monitor)  # a pipe goes as fd:
    writer = StateFile(state_file) if stop_and_copy else StateWriter(state_file)
    try:
        writer.channel = hand_state_fd(monitor, writer.write_end, STATE_FD_NAME,
                                       file_uris=file_uris)
    except BaseException:
        writer.close()
        raise
    writer.monitor = monitor
    writer.handed_over()
    return writer


# -- the migration's end -----------------------------------------------------------------------
def wait_migration(monitor: Monitor, timeout: float) -> dict[str, Any]:
    """Until the RAM snapshot completed; its ``query-migrate`` answer. Raises if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        info = monitor.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in MIGRATION_FAILED:
            desc = info.get("error-desc", "")
            if "Unable to write" in desc:  # stop-and-copy, QEMU writing the file itself
                raise HostError(f"cannot write the RAM state: {desc}", STATE_SPACE_HINT)
            raise VMError(f"saving the VM's RAM {status}: {desc}",
                          "check free space in the work directory")
        if time.monotonic() > deadline:
            raise StepTimeout(f"saving the VM's RAM took more than {timeout:g} s")
        time.sleep(0.02)


def capture_done(info: dict[str, Any]) -> bool:
    """Has a background snapshot captured the VM (CPU and device state saved, guest RAM
    write-protected)? Yes once ``query-migrate`` counts a RAM page sent.

    QEMU's ``bg_migration_thread()`` (migration/migration.c, 7.2 and 10.0 alike) runs, in
    order: ``ram_write_tracking_prepare()``; ``qemu_savevm_state_setup()``, where
    ``ram_save_setup()`` writes the RAM block list and an EOS flag but no page (so
    ``transferred`` moves in setup already); status SETUP -> ACTIVE; then under the BQL
    ``vm_stop_force_state()`` (10.0: ``migration_stop_vm()``), the non-iterable device state
    into a buffer, ``ram_write_tracking_start()``, ``bg_migration_vm_start_bh()`` scheduled;
    the BQL released; and only then the loop of ``bg_migration_iteration_run()`` ->
    ``ram_save_iterate()``, the one place that counts a page as ``normal`` or ``duplicate``
    (zero; counters reset by ``migrate_init()``). "active" alone is too early: it is set
    before the VM is stopped and its state saved.
    """
    memory = info.get("ram", {})
    pages = int(memory.get("normal", 0)) + int(memory.get("duplicate", 0))
    return info.get("status") == "active" and pages > 0


def resume_after_capture(backend: Backend) -> None:
    """Resume a parent the capture left paused, unless QEMU resumed it itself.

    The start BH was scheduled under the BQL before the first page went: the main loop
    runs it at the latest in the iteration that answered the ``query-migrate`` showing
    that page, so by our next command it has run. QEMU 7.2's BH calls ``vm_start()``
    (running: its RESUME is on the way); 9.0 on, ``vm_resume(vm_old_state)`` restores the
    run state ``migrate`` found, paused by us, and the VM waits for our ``cont``. Ours can
    thus never come before that BH (whose ``runstate_set(PAUSED)`` would then mislabel a
    running VM); a late duplicate ``cont`` is harmless to QEMU, and libvirt may refuse to
    resume a domain it already sees running: then only the run state counts.
    """
    monitor = backend.monitor
    if monitor.runstate() == "running":
        return
    try:
        backend.resume()
    except VMError:
        if monitor.runstate() != "running":
            raise


def wait_migration_finalized(monitor: Monitor, timeout: float = 10.0) -> None:
    """QEMU reports "completed" a moment before it leaves runstate finish-migrate, and
    ``cont`` in between fails ("Migration is not finalized yet": seen in 2 of 36 forks)."""
    deadline = time.monotonic() + timeout
    while monitor.runstate() == "finish-migrate":
        if time.monotonic() > deadline:
            raise StepTimeout(f"QEMU did not finalize the RAM save within {timeout:g} s")
        time.sleep(0.002)


def settle_migration(monitor: Monitor, stall: float = 120.0) -> str | None:
    """Let an unfinished RAM snapshot end; cancel it only if it makes no progress.

    Cancelling a background snapshot while it write-protects guest RAM can leave the guest
    hung (seen with QEMU 7.2); letting it finish costs seconds (minutes for a large VM) and
    a file we delete anyway. So it is cancelled only after ``stall`` seconds without a byte
    transferred. Returns the final migration status.
    """
    info = monitor.execute("query-migrate")
    progress, since = None, time.monotonic()
    while info.get("status") in MIGRATION_UNFINISHED:
        moved = info.get("ram", {}).get("transferred")
        if moved != progress:
            progress, since = moved, time.monotonic()
        elif time.monotonic() - since > stall:
            monitor.execute("migrate_cancel")
            log.warning("cancelled a RAM snapshot that made no progress for %g s", stall)
            return "cancelled"
        time.sleep(0.05)
        info = monitor.execute("query-migrate")
    return info.get("status")


def resume_if_paused(backend: Backend, timeout: float = 30.0,
                     states: tuple[str, ...] = PAUSED) -> str | None:
    """Resume a parent that a fork left paused; the run state it was in, if it was.

    ``states``: the run states our fork leaves. Without a RAM snapshot of ours only
    ``paused``: a VM in ``postmigrate`` was migrated away by someone else, and running it
    again would run it twice.
    """
    with contextlib.suppress(StepTimeout):
        wait_migration_finalized(backend.monitor, timeout)
    runstate = backend.monitor.runstate()
    if runstate not in states:
        return None
    backend.resume()
    return runstate
