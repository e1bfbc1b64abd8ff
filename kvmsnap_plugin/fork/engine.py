"""The fork point: one instant of the parent's disks and RAM, with the parent paused briefly.

Everything that can be prepared runs before the pause: overlay files are created and
attached (``blockdev-add``), migration capabilities set, the RAM state file opened and its
descriptor handed to QEMU. The pause itself holds only ``stop``, one ``transaction`` of
``blockdev-snapshot`` actions (the parent continues on the new overlays, the old images are
frozen) and the start of the RAM snapshot.

With ``background-snapshot`` QEMU's migration thread captures the CPU and device state and
write-protects RAM, then resumes the VM itself (QEMU 7.2) and streams RAM copy-on-write
while the guest runs. Newer QEMU restores the previous runstate instead, leaving a VM we
paused paused. We never assume either: we watch for RESUME and for the migration's end,
and send ``cont`` only if QEMU did not resume the VM after the capture.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvmsnap_plugin.errors import HostError, KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.host import faults, probes, process
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import ForkedDisk, ForkPoint, Parent, ParentDisk, RamMethod
from kvmsnap_plugin.vm.qmp import QmpSession

log = logging.getLogger("kvmsnap")

STATE_FD_NAME = "kvmsnap-state"






def parent_overlay_path(disk: ParentDisk, run_id: str, overlay_dir: Path | None) -> Path:
    """Where the parent writes during the backup: next to its image unless told otherwise.

    Next to the image means the same filesystem and the same persistence as the image, so
    a host crash mid-backup leaves a chain that ``kvmsnap recover`` can commit.
    """
    frozen = Path(disk.filename)
    directory = overlay_dir or frozen.parent
    return directory / f"{frozen.name}.kvmsnap-{run_id}.qcow2"




def plan_fork(parent: Parent, run_id: str, overlay_dir: Path | None) -> tuple[ForkedDisk, ...]:
    """The parent's overlays-to-be: recorded in the journal before they exist."""
    return tuple(ForkedDisk(disk, parent_overlay_path(disk, run_id, overlay_dir),
                            f"kvmsnap-{run_id}-{index}")
                 for index, disk in enumerate(parent.writable_disks))


def take_fork(session: QmpSession, parent: Parent, planned: tuple[ForkedDisk, ...],
              state_file: Path, *, method: str = "auto", timeout: float = 600.0) -> ForkPoint:
    """Fork the parent's disks and RAM at one instant. The parent runs again on return.

    On failure the parent is resumed and its chain restored before the error propagates.
    """
    forked = _attach_overlays(session, planned)
    applied = False
    saved_caps = _migration_capabilities(session)
    writer: StateSink | None = None
    try:
        method = _configure_migration(session, method)
        writer = _open_state_fd(session, state_file, method)
        log.info("pausing %s for the fork (%s)", parent.name, method)
        point = _pause_and_snapshot(session, parent, forked, state_file, method, timeout)
        applied = True
        writer.finish()
        return point
    except BaseException:
        applied = applied or _snapshot_applied(session, forked)
        _recover_parent(session, forked, applied)
        state_file.unlink(missing_ok=True)
        raise
    finally:
        if writer:
            writer.close()
        _restore_capabilities(session, saved_caps)


# -- before the pause ------------------------------------------------------------------------
def _attach_overlays(session: QmpSession,
                     planned: tuple[ForkedDisk, ...]) -> tuple[ForkedDisk, ...]:
    try:
        for forked in planned:
            disk = forked.disk
            create_overlay(forked.parent_overlay, disk.filename, disk.format, disk.virtual_size)
            session.execute("blockdev-add", {
                "driver": "qcow2", "node-name": forked.overlay_node, "backing": None,
                "file": {"driver": "file", "filename": str(forked.parent_overlay)}})
    except BaseException:
        _detach_overlays(session, planned)
        raise
    return planned


def _detach_overlays(session: QmpSession, forked: Sequence[ForkedDisk]) -> None:
    for disk in forked:
        try:
            session.execute("blockdev-del", {"node-name": disk.overlay_node})
        except KvmsnapError as exc:
            log.debug("blockdev-del %s: %s", disk.overlay_node, exc)
        disk.parent_overlay.unlink(missing_ok=True)


def _migration_capabilities(session: QmpSession) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in session.execute("query-migrate-capabilities")}


def _configure_migration(session: QmpSession, method: str) -> str:
    """Set up the RAM snapshot; returns the method that will run."""
    # Unthrottled: the default cap (32 MiB/s) would stretch a stop-and-copy pause to seconds.
    session.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    if method in ("auto", RamMethod.BACKGROUND):
        supported, why = probes.uffd_wp_supported()
        if supported:
            try:
                session.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": RamMethod.BACKGROUND, "state": True}]})
                return RamMethod.BACKGROUND
            except VMError as exc:
                why = str(exc)
        if method == RamMethod.BACKGROUND:
            raise VMError(f"background snapshot unavailable: {why}",
                          "use --method stop-and-copy (longer pause) or run as root")
        log.warning("background snapshot unavailable (%s); falling back to stop-and-copy, "
                    "the VM will pause for the whole RAM save", why)
    session.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": RamMethod.BACKGROUND, "state": False}]})
    return RamMethod.STOP_AND_COPY


def _restore_capabilities(session: QmpSession, saved: dict[str, bool]) -> None:
    try:
        session.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": RamMethod.BACKGROUND, "state": saved.get(RamMethod.BACKGROUND, False)}]})
    except KvmsnapError as exc:
        log.debug("restoring migration capabilities: %s", exc)


#: what a failed RAM state write tells the user to do
STATE_SPACE_HINT = ("free space in the work directory (it needs about the VM's RAM size), "
                    "or pass --workdir on a larger filesystem")


class StateSink:
    """Where QEMU's RAM stream goes: ``write_end`` is the fd handed to QEMU."""

    write_end: int = -1

    def handed_over(self) -> None:
        """QEMU has received its own copy of ``write_end``."""

    def finish(self, timeout: float = 600.0) -> None:
        """After the migration completed: all of it is on disk, or raise."""
        raise NotImplementedError

    def close(self) -> None:
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
        ready_r, ready_w = os.pipe()
        try:
            with open(self._errors, "wb") as err:
                self._proc = process.spawn(
                    [sys.executable, "-m", "kvmsnap_plugin.fork.statewriter", str(ready_w)],
                    stdin=read_end, stdout=out, stderr=err, pass_fds=(ready_w,))
        finally:
            for fd in (read_end, out, ready_w):
                os.close(fd)
        try:
            self._wait_ready(ready_r)
        except BaseException:
            self.close()
            process.stop(self._proc, grace=1)
            raise
        finally:
            os.close(ready_r)

    def _wait_ready(self, ready: int, timeout: float = 30.0) -> None:
        """Until the writer runs: its interpreter start-up (~30 ms of CPU) must not overlap
        the guest's pause."""
        readable, _, _ = select.select([ready], [], [], timeout)
        if not readable or os.read(ready, 1) != b"1":
            reason = self._errors.read_text(errors="replace").strip()
            raise HostError(f"the RAM state writer did not start: {reason or 'no answer'}",
                            "run `kvmsnap doctor`; rerun with --debug")

    def handed_over(self) -> None:
        """QEMU has its own copy of the write end: ours must go, or EOF never comes."""
        self.close()

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
            self.close()


def _open_state_fd(session: QmpSession, state_file: Path, method: str) -> StateSink:
    """Create the RAM state file and hand QEMU the fd that leads to it."""
    writer = StateFile(state_file) if method == RamMethod.STOP_AND_COPY else StateWriter(state_file)
    try:
        session.send_fd(writer.write_end, STATE_FD_NAME)
    finally:
        writer.handed_over()
    return writer


# -- the pause ---------------------------------------------------------------------------------
def _pause_and_snapshot(session: QmpSession, parent: Parent, forked: Sequence[ForkedDisk],
                        state_file: Path, method: str, timeout: float) -> ForkPoint:
    session.events()  # forget older events: STOP/RESUME below must be ours
    session.execute("stop")
    stop = session.wait_event("STOP", 10)
    faults.point("paused")
    started = time.monotonic()
    session.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": d.disk.node, "overlay": d.overlay_node}}
        for d in forked]})
    disk_ms = (time.monotonic() - started) * 1000
    faults.point("disk-snapshot")
    session.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
    faults.point("ram-save")
    resume = _wait_for_resume(session, method, timeout)
    pause_ms = (resume.timestamp - stop.timestamp) * 1000
    log.info("%s ran again after %.1f ms; saving its RAM", parent.name, pause_ms)
    info = _wait_migration(session, timeout)
    ram = info.get("ram", {})
    return ForkPoint(parent, tuple(forked), state_file, method, pause_ms, disk_ms,
                     info.get("total-time", 0) / 1000, int(ram.get("total", 0)),
                     info.get("downtime"))


def _wait_for_resume(session: QmpSession, method: str, timeout: float):
    """The RESUME that ends the pause, sending ``cont`` only where QEMU will not."""
    if method == RamMethod.STOP_AND_COPY:
        _wait_migration(session, timeout)
        _wait_migration_finalized(session)
        session.execute("cont")
        return session.wait_event("RESUME", 10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return session.wait_event("RESUME", 0.02)
        except StepTimeout:
            pass
        status = session.execute("query-migrate").get("status")
        if status == "completed":
            # QEMU kept the VM paused after the capture (QEMU 8.2+ behaviour).
            session.execute("cont")
            return session.wait_event("RESUME", 10)
        if status in ("failed", "cancelled"):
            raise VMError(f"the RAM snapshot {status}", "see the VM's QEMU log")
    raise StepTimeout(f"the RAM snapshot did not capture the VM within {timeout:g} s")


def _wait_migration_finalized(session: QmpSession, timeout: float = 10.0) -> None:
    """QEMU reports "completed" a moment before it leaves runstate finish-migrate, and
    ``cont`` in between fails ("Migration is not finalized yet": seen in 2 of 36 forks)."""
    deadline = time.monotonic() + timeout
    while session.runstate() == "finish-migrate":
        if time.monotonic() > deadline:
            raise StepTimeout(f"QEMU did not finalize the RAM save within {timeout:g} s")
        time.sleep(0.002)


def _wait_migration(session: QmpSession, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = session.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc", "")
            if "Unable to write" in desc:  # stop-and-copy, QEMU writing the file itself
                raise HostError(f"cannot write the RAM state: {desc}", STATE_SPACE_HINT)
            raise VMError(f"saving the VM's RAM {status}: {desc}",
                          "check free space in the work directory")
        if time.monotonic() > deadline:
            raise StepTimeout(f"saving the VM's RAM took more than {timeout:g} s")
        time.sleep(0.02)


# -- undo ---------------------------------------------------------------------------------------
def settle_migration(session: QmpSession, timeout: float = 120.0) -> str | None:
    """Let an unfinished RAM snapshot end; cancel it only if it does not.

    Cancelling a background snapshot while it write-protects guest RAM can leave the guest
    hung (seen with QEMU 7.2); letting it finish costs seconds and a file we delete anyway.
    Returns the final migration status.
    """
    deadline = time.monotonic() + timeout
    status = session.execute("query-migrate").get("status")
    while status in ("setup", "active", "device", "pre-switchover"):
        if time.monotonic() > deadline:
            session.execute("migrate_cancel")
            log.warning("cancelled a RAM snapshot that did not finish in %g s", timeout)
            return "cancelled"
        time.sleep(0.05)
        status = session.execute("query-migrate").get("status")
    return status



def _snapshot_applied(session: QmpSession, forked: Sequence[ForkedDisk]) -> bool:
    """Is any overlay already the active layer of a parent disk?"""
    try:
        tops = {b["inserted"]["node-name"] for b in session.execute("query-block")
                if b.get("inserted")}
    except KvmsnapError:
        return False
    return any(d.overlay_node in tops for d in forked)


def _recover_parent(session: QmpSession, forked: Sequence[ForkedDisk], applied: bool) -> None:
    """After a failed fork: the parent runs, on its original chain, holding every write."""
    from kvmsnap_plugin.fork.chain import commit_back

    try:
        settle_migration(session)
        if session.runstate() != "running":
            session.execute("cont")
    except KvmsnapError as exc:
        log.error("could not resume the parent after a failed fork: %s", exc)
    try:
        if applied:
            commit_back(session, forked)
        else:
            _detach_overlays(session, forked)
    except KvmsnapError as exc:
        log.error("could not restore the parent's disk chain: %s (run `kvmsnap recover`)", exc)
