"""A bare QEMU reached through its QMP unix socket.

The overlays are attached (``blockdev-add``) before the pause and put on top of the disks
by one ``transaction`` of ``blockdev-snapshot`` actions; the chain is given back by an
active ``block-commit`` and ``block-job-complete``, which pivots each disk back onto its
frozen image; an overlay that another tool's snapshot sits on is committed through the
middle of the chain (``block-commit`` with ``top-node``/``base-node``), no pivot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.host import faults, process
from kvmsnap_plugin.model import ForkedDisk, JournalState, Parent
from kvmsnap_plugin.vm.parent import discover
from kvmsnap_plugin.vm.qmp import Event, QmpSession, peer_pid

log = logging.getLogger(__name__)

#: how long recovery waits for a QMP socket that exists
RECOVERY_CONNECT_TIMEOUT = 30.0
#: how long a QMP command of the parent may take
COMMAND_TIMEOUT = 30.0
#: tests only: a shorter command timeout, to make a hung QEMU (SIGSTOP) time out quickly;
#: recovery's connect timeout too (a stopped QEMU's socket takes the connection but never
#: greets: the run's final sweep would wait the full 30 s for it)
TEST_TIMEOUT_ENV = "KVMSNAP_TEST_QMP_TIMEOUT"


def command_timeout() -> float:
    return float(os.environ.get(TEST_TIMEOUT_ENV) or COMMAND_TIMEOUT)


def recovery_connect_timeout() -> float:
    return float(os.environ.get(TEST_TIMEOUT_ENV) or RECOVERY_CONNECT_TIMEOUT)


class QmpBackend:
    """The parent as a QMP session, held for the whole run (QMP serves one client)."""

    kind = "qmp"

    def __init__(self, socket: Path, pid: int | None = None, *, running: bool = True,
                 connect_timeout: float = 10.0) -> None:
        self.socket = socket
        self.running = running
        self.pid = pid or (peer_pid(socket) if running else 0)
        self.connect_timeout = connect_timeout
        self.monitor = QmpSession(socket, name="parent", command_timeout=command_timeout())

    def __enter__(self) -> QmpBackend:
        if self.running:
            self.monitor.connect(timeout=self.connect_timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self.monitor.close()

    def describe(self) -> Parent:
        return discover(self.monitor, self.socket, self.pid)

    def online(self) -> bool:
        return self.running

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind, "qmp": str(self.socket),
                "parent": process.identity(self.pid)}

    # -- the fork -------------------------------------------------------------------------
    def pause(self) -> None:
        self.monitor.execute("stop")

    def resume(self) -> None:
        self.monitor.execute("cont")

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        for forked in planned:
            self.monitor.execute("blockdev-add", {
                "driver": "qcow2", "node-name": forked.overlay_node, "backing": None,
                "file": {"driver": "file", "filename": str(forked.parent_overlay)}})

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        for forked in planned:
            try:
                self.monitor.execute("blockdev-del", {"node-name": forked.overlay_node})
            except KvmsnapError as exc:  # never attached, or already gone; a node still in
                # use is refused by QEMU and then keeps its file (delete_overlay checks)
                log.debug("blockdev-del %s: %s", forked.overlay_node, exc)

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        self.monitor.execute("transaction", {"actions": [
            {"type": "blockdev-snapshot", "data": {"node": d.disk.node, "overlay": d.overlay_node}}
            for d in planned]})

    def offline_refusal(self, disks: Sequence[ForkedDisk]) -> str | None:
        return None  # its QEMU is gone: nothing else knows of the overlays

    def point_config_back(self, disks: Sequence[ForkedDisk]) -> list[str]:
        return []  # a bare QEMU has no stored configuration

    # -- the commit back ------------------------------------------------------------------
    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        job = commit_job(disk)
        jobs = self._jobs()
        if job in jobs:  # left by an interrupted run: finish it rather than start anew
            if jobs[job].get("ready"):
                self.monitor.execute("block-job-complete", {"device": job})
        else:
            self.monitor.execute("block-commit", {"job-id": job, "device": disk.overlay_node,
                                                  "base-node": disk.disk.node})
            faults.point("commit")
        return self._committed(disk, job, timeout)

    def commit_below(self, disk: ForkedDisk, root: str, timeout: float) -> int:
        """An intermediate commit: QEMU rewrites the upper image's backing file to the frozen
        image and drops our overlay from the chain; no pivot."""
        job = commit_job(disk)
        if job not in self._jobs():
            self.monitor.execute("block-commit", {
                "job-id": job, "device": root, "top-node": disk.overlay_node,
                "base-node": disk.disk.node})
            faults.point("commit")
        return self._committed(disk, job, timeout)

    def _committed(self, disk: ForkedDisk, job: str, timeout: float) -> int:
        """Wait for the commit job to end with every byte in the frozen image (an active
        commit pivots once ready); bytes written. Raises, and the caller keeps the overlay,
        if the job failed or was cancelled (by us on timeout, or by anyone else)."""
        ends = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        ended = self._wait_job(job, ends, timeout)
        if ended.name == "BLOCK_JOB_READY":
            self.monitor.execute("block-job-complete", {"device": job})
            ended = self._wait_job(job, ends[1:], timeout)
        if ended.name == "BLOCK_JOB_CANCELLED" or ended.data.get("error"):
            why = ended.data.get("error") or "the job was cancelled"
            raise VMError(f"block-commit of {disk.disk.device} failed: {why}; its overlay is "
                          "kept", "run `kvmsnap recover` to commit it again")
        return int(ended.data.get("len", 0))

    def _jobs(self) -> dict[str, dict[str, Any]]:
        return {j["device"]: j for j in self.monitor.execute("query-block-jobs")}

    def _wait_job(self, job: str, names: tuple[str, ...], timeout: float) -> Event:
        try:
            return self.monitor.wait_event(names, timeout, lambda e: e.data.get("device") == job)
        except StepTimeout:
            self.monitor.execute("block-job-cancel", {"device": job, "force": True})
            raise


def commit_job(disk: ForkedDisk) -> str:
    """The block job that commits ``disk``'s overlay: named after the overlay's node, so a
    later run (recovery) finds the job of an interrupted one."""
    return f"{disk.overlay_node}-commit"


def reopen(state: JournalState) -> QmpBackend:
    """The parent a journal names: online if the same QEMU still serves its socket."""
    socket = Path(state.qmp or "")
    pid = process.same_process(state.parent)
    if pid is not None and not socket.exists():
        # Its QEMU runs, on the overlay: only its monitor can commit it. "Offline" here
        # would unlink or commit a file the VM is still writing to.
        raise VMError(f"the VM's QEMU (pid {pid}) still runs but its QMP socket {socket} "
                      "cannot be seen from here; its overlays are kept",
                      "run `kvmsnap recover` where the socket is visible (not in a private "
                      "/tmp or another mount namespace)")
    return QmpBackend(socket, pid, running=pid is not None,
                      connect_timeout=recovery_connect_timeout())
