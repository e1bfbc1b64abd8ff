"""The fork engine against a fake backend: ordering, the resume decision and the undo.

The fakes play QEMU's part: the QMP answers and the STOP/RESUME events (with timestamps)
a real QEMU gives in each case, e.g. QEMU 7.2 resuming the VM itself after a background
snapshot's capture, QEMU 9 leaving it paused. test_chain.py and test_recovery.py use them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvmsnap_plugin.errors import StepTimeout, VMError
from kvmsnap_plugin.fork import engine, ram
from kvmsnap_plugin.model import ForkedDisk, Parent, ParentDisk, RamMethod
from kvmsnap_plugin.vm.qmp import Event


class FakeMonitor:
    """QEMU's monitor as the engine sees it; ``on_migrate`` plays the RAM snapshot."""

    def __init__(self, on_migrate: str = "qemu-7.2") -> None:
        self.on_migrate = on_migrate
        self.commands: list[str] = []
        self.capabilities: list[bool] = []
        self.pending: list[Event] = []
        self.state = "running"
        self.migration = "none"
        self.runstates: list[str] = []  # run states to report before ``state``
        self.clock = 1000.0

    def emit(self, name: str) -> None:
        self.clock += 0.040
        self.pending.append(Event(name, {}, self.clock))

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        self.commands.append(command)
        if command == "query-migrate":
            return {"status": self.migration, "total-time": 2500, "ram": {"total": 4096},
                    "downtime": 7, "error-desc": "boom"}
        if command == "query-migrate-capabilities":
            return [{"capability": "background-snapshot", "state": False}]
        if command == "migrate-set-capabilities":
            self.capabilities.append(arguments["capabilities"][0]["state"])
        if command == "migrate":
            self._migrate()
        return {}

    def _migrate(self) -> None:
        if self.on_migrate == "fail":
            self.migration = "failed"
            return
        self.migration = "completed"
        if self.on_migrate == "qemu-7.2":  # resumes the VM itself after the capture
            self.state = "running"
            self.emit("RESUME")
        elif self.on_migrate == "stop-and-copy":
            self.state = "postmigrate"
            self.runstates = ["finish-migrate", "finish-migrate"]
        # "qemu-9": restores the previous run state: paused

    def send_fd(self, fd: int, name: str) -> None:
        self.commands.append(f"getfd {name}")

    def runstate(self) -> str:
        return self.runstates.pop(0) if self.runstates else self.state

    def events(self) -> list[Event]:
        taken, self.pending = self.pending, []
        return taken

    def wait_event(self, names: str | Iterable[str], timeout: float,
                   match: Callable[[Event], bool] = lambda e: True) -> Event:
        wanted = {names} if isinstance(names, str) else set(names)
        for event in self.pending:
            if event.name in wanted and match(event):
                self.pending.remove(event)
                return event
        raise StepTimeout(f"no {wanted} event")


class FakeBackend:
    """A parent whose disks are a set of overlays on top; records what was asked of it."""

    kind = "fake"

    def __init__(self, monitor: FakeMonitor | None = None, *, running: bool = True) -> None:
        self.monitor = monitor or FakeMonitor()
        self.running = running
        self.calls: list[tuple[str, ...]] = []
        self.on_top: set[str] = set()
        self.fail_snapshot = False
        self.fail_commit: set[str] = set()
        self.config_pointed: list[str] = []

    def __enter__(self) -> FakeBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append(("closed",))

    def describe(self) -> Parent:
        return parent_of(2)

    def pause(self) -> None:
        self.calls.append(("pause",))
        self.monitor.state = "paused"
        self.monitor.emit("STOP")

    def resume(self) -> None:
        self.calls.append(("resume",))
        self.monitor.state = "running"
        self.monitor.emit("RESUME")

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        self.calls.append(("attach", *(d.overlay_node for d in planned)))

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        self.calls.append(("detach", *(d.overlay_node for d in planned)))

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        self.calls.append(("snapshot", *(d.overlay_node for d in planned)))
        if self.fail_snapshot:
            raise VMError("the disk snapshot failed")
        self.on_top |= {d.overlay_node for d in planned}

    def active_overlays(self, planned: Sequence[ForkedDisk]) -> list[ForkedDisk]:
        return [d for d in planned if d.overlay_node in self.on_top]

    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        self.calls.append(("commit", disk.overlay_node))
        if disk.overlay_node in self.fail_commit:
            raise VMError("block-commit failed")
        self.on_top.discard(disk.overlay_node)
        return 1000

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind}

    def online(self) -> bool:
        return self.running

    def point_config_back(self, disks: Sequence[ForkedDisk]) -> list[str]:
        self.config_pointed = [d.disk.device for d in disks]
        return self.config_pointed


def parent_of(disks: int, directory: Path = Path("/images")) -> Parent:
    return Parent(Path("/run/qmp.sock"), 4242, "web", ("qemu-system-x86_64",), (9, 2, 0),
                  tuple(ParentDisk(f"vd{chr(97 + i)}", f"node{i}", str(directory / f"d{i}.qcow2"),
                                   "qcow2", 1 << 30, False, ()) for i in range(disks)))


def planned_in(tmp_path: Path, disks: int = 2) -> tuple[ForkedDisk, ...]:
    return engine.plan_fork(parent_of(disks, tmp_path), "7-1", None)


@pytest.fixture(autouse=True)
def no_host(monkeypatch):
    """No qemu-img and no userfaultfd probe: overlays are empty files, uffd-wp works.

    The RAM state writers are real; a failed fork leaves its writer to end on its own
    (QEMU closes the pipe once the migration settled), so the test reaps them.
    """
    monkeypatch.setattr(engine, "create_overlay",
                        lambda path, backing, fmt, size: Path(path).write_bytes(b"QFI\xfb"))
    monkeypatch.setattr(ram.probes, "uffd_wp_supported", lambda: (True, ""))
    writers = []

    class Writer(ram.StateWriter):
        def __init__(self, state_file: Path) -> None:
            super().__init__(state_file)
            writers.append(self)

    monkeypatch.setattr(ram, "StateWriter", Writer)
    yield
    for writer in writers:
        writer.finish(timeout=10)


def fork(backend: FakeBackend, tmp_path: Path, method: str = "auto", disks: int = 2):
    planned = planned_in(tmp_path, disks)
    (tmp_path / "run").mkdir()
    return planned, engine.take_fork(backend, parent_of(disks, tmp_path), planned,
                                     tmp_path / "run" / "ram.state", method=method, timeout=5)


def test_the_overlays_are_ready_before_the_pause_and_qemu_72_resumes_by_itself(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-7.2"))
    planned, point = fork(backend, tmp_path)
    nodes = ("kvmsnap-7-1-0", "kvmsnap-7-1-1")
    assert backend.calls == [("attach", *nodes), ("pause",), ("snapshot", *nodes)]
    assert all(d.parent_overlay.exists() for d in planned)
    commands = backend.monitor.commands
    assert commands.index("getfd kvmsnap-state") < commands.index("migrate")
    assert point.method is RamMethod.BACKGROUND and point.disks == planned
    assert point.pause_ms == pytest.approx(40.0)  # STOP to RESUME, QEMU's timestamps
    assert (point.ram_bytes, point.ram_save_s, point.qemu_downtime_ms) == (4096, 2.5, 7)
    assert backend.monitor.capabilities == [True, False]  # on for the fork, then put back


def test_qemu_9_leaves_the_vm_paused_after_the_capture_so_we_resume_it_once(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-9"))
    _, point = fork(backend, tmp_path)
    assert backend.calls.count(("resume",)) == 1 and backend.monitor.state == "running"
    assert point.method is RamMethod.BACKGROUND


def test_stop_and_copy_resumes_only_once_qemu_left_finish_migrate(tmp_path):
    monitor = FakeMonitor("stop-and-copy")
    backend = FakeBackend(monitor)
    _, point = fork(backend, tmp_path, method=RamMethod.STOP_AND_COPY)
    assert monitor.runstates == [] and backend.calls[-1] == ("resume",)
    assert point.method is RamMethod.STOP_AND_COPY and monitor.capabilities == [False, False]
    assert (tmp_path / "run" / "ram.state").exists()


def test_a_failure_after_the_disk_snapshot_commits_back_and_resumes(tmp_path):
    backend = FakeBackend(FakeMonitor("fail"))
    planned = planned_in(tmp_path)
    with pytest.raises(VMError, match="the RAM snapshot failed"):
        fork(backend, tmp_path)
    assert ("resume",) in backend.calls and backend.monitor.state == "running"
    assert [c for c in backend.calls if c[0] == "commit"] == [
        ("commit", "kvmsnap-7-1-0"), ("commit", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)
    assert not (tmp_path / "run" / "ram.state").exists()
    assert backend.monitor.capabilities[-1] is False


def test_a_failure_before_the_disk_snapshot_detaches_and_commits_nothing(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-7.2"))
    backend.fail_snapshot = True
    planned = planned_in(tmp_path)
    with pytest.raises(VMError, match="the disk snapshot failed"):
        fork(backend, tmp_path)
    assert not [c for c in backend.calls if c[0] == "commit"]
    assert backend.calls[-2:] == [("resume",), ("detach", "kvmsnap-7-1-0", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)


def test_a_failed_attach_deletes_the_overlays_and_never_pauses(tmp_path):
    backend = FakeBackend()

    def refuse(planned: Sequence[ForkedDisk]) -> None:
        raise VMError("blockdev-add failed")

    backend.attach_overlays = refuse
    planned = planned_in(tmp_path)
    with pytest.raises(VMError, match="blockdev-add"):
        fork(backend, tmp_path)
    assert backend.calls == [("detach", "kvmsnap-7-1-0", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)


def test_a_shut_off_vm_is_not_forked(tmp_path):
    offline = Parent(None, 0, "web", (), (0, 0, 0), parent_of(1).disks, offline=True)
    with pytest.raises(VMError, match="shut off"):
        engine.take_fork(FakeBackend(), offline, (), tmp_path / "ram.state")


def test_overlays_are_planned_next_to_their_images_unless_told(tmp_path):
    planned = planned_in(tmp_path, 2)
    assert [d.parent_overlay for d in planned] == [
        tmp_path / "d0.qcow2.kvmsnap-7-1.qcow2", tmp_path / "d1.qcow2.kvmsnap-7-1.qcow2"]
    elsewhere = engine.plan_fork(parent_of(1, tmp_path), "7-1", Path("/fast"))
    assert elsewhere[0].parent_overlay == Path("/fast/d0.qcow2.kvmsnap-7-1.qcow2")


def test_the_facade_delegates_to_the_backend(tmp_path):
    backend = FakeBackend()
    with engine.ParentHandle(backend) as parent:
        assert parent.describe().name == "web"
        assert parent.journal_fields() == {"backend": "fake"}
    assert backend.calls == [("closed",)]
