"""A bare QEMU reached through its QMP unix socket."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.fork.chain import commit_back
from kvmsnap_plugin.fork.engine import settle_migration, take_fork
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import Commit, ForkedDisk, ForkPoint, JournalState, Parent, Phase
from kvmsnap_plugin.vm.parent import discover
from kvmsnap_plugin.vm.qmp import QmpSession, peer_pid

log = logging.getLogger("kvmsnap")


class QmpParent:
    """The parent as a QMP session, held for the whole run (QMP serves one client)."""

    kind = "qmp"

    def __init__(self, socket: Path, pid: int | None = None) -> None:
        self.socket = socket
        self.pid = pid or peer_pid(socket)
        self.session = QmpSession(socket, name="parent")

    def __enter__(self) -> QmpParent:
        self.session.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def describe(self) -> Parent:
        return discover(self.session, self.socket, self.pid)

    def fork(self, parent: Parent, planned: tuple[ForkedDisk, ...], state_file: Path,
             method: str) -> ForkPoint:
        return take_fork(self.session, parent, planned, state_file, method=method)

    def commit_back(self, disks: Sequence[ForkedDisk]) -> list[Commit]:
        return commit_back(self.session, disks)

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind, "qmp": str(self.socket),
                "parent": process.identity(self.pid)}


def restore(state: JournalState, disks: list[ForkedDisk], result: Any) -> None:
    """Recovery for a QMP parent: online if its QEMU still runs, else offline."""
    socket = Path(state.qmp or "")
    if process.same_process(state.parent) and socket.exists():
        with QmpSession(socket, name="recover") as session:
            session.connect(timeout=30)
            _resume(session, state, result)
            _commit_online(session, disks, result)
    else:
        commit_offline(disks, result)


def _resume(session: QmpSession, state: JournalState, result: Any) -> None:
    """Resume the parent if our fork left it paused or mid-snapshot."""
    if session.execute("query-migrate").get("status") in ("setup", "active", "device"):
        result.did(f"let an unfinished RAM snapshot end ({settle_migration(session)})")
    runstate = session.runstate()
    if state.phase is Phase.FORKING and runstate in ("paused", "postmigrate", "finish-migrate"):
        deadline = time.monotonic() + 30
        while session.runstate() == "finish-migrate" and time.monotonic() < deadline:
            time.sleep(0.1)
        session.execute("cont")
        result.did(f"resumed the parent (it was {runstate})")


def _commit_online(session: QmpSession, disks: list[ForkedDisk], result: Any) -> None:
    if not disks:
        return
    in_use = {n.get("file") for n in session.execute("query-named-block-nodes")}
    active = [d for d in disks if str(d.parent_overlay) in in_use]
    for commit in commit_back(session, active):
        result.did(f"committed the parent's overlay of {commit.device} back")
    for disk in disks:
        if disk not in active and disk.parent_overlay.exists():
            disk.parent_overlay.unlink()  # never used by the parent: holds no guest data
            result.did(f"deleted the unused overlay {disk.parent_overlay.name}")


def commit_offline(disks: list[ForkedDisk], result: Any) -> None:
    """The parent's QEMU is gone: fold each overlay's writes into its frozen image."""
    for disk in disks:
        if not disk.parent_overlay.exists():
            continue
        process.run(["qemu-img", "commit", "-q", "-f", "qcow2", disk.parent_overlay],
                    timeout=3600)
        disk.parent_overlay.unlink()
        result.did(f"committed {disk.parent_overlay.name} into {disk.frozen.name} offline "
                   "(the VM was not running)")
