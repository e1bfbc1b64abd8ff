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

from kvmsnap_plugin.errors import HostError, StepTimeout, VMError
from kvmsnap_plugin.fork import engine, ram
from kvmsnap_plugin.model import ForkedDisk, Parent, ParentDisk, RamMethod
from kvmsnap_plugin.vm.qmp import Event


def nested(files: Sequence[str]) -> dict[str, Any] | None:
    """A QMP ImageInfo for ``files``, top down."""
    image = None
    for filename in reversed(files):
        image = {"filename": filename, **({"backing-image": image} if image else {})}
    return image


class FakeMonitor:
    """QEMU's monitor as the engine sees it; ``on_migrate`` plays the RAM snapshot.

    The block graph is ``chains`` (a device's image files, top down) plus ``attached``
    (overlays added with blockdev-add and in no chain yet, by file name).
    """

    def __init__(self, on_migrate: str = "qemu-7.2") -> None:
        self.on_migrate = on_migrate
        self.schema: list[dict[str, Any]] = [{"meta-type": "enum", "values": ["unix", "tcp"]}]
        self.fdsets: dict[int, str] = {}  # fdset id -> opaque
        self.uris: list[str] = []
        self.mapped_ram: bool | None = None  # a QEMU without the capability
        self.pages = 0  # RAM pages a running migration has sent
        self.resumed_while: list[str] = []  # the migration status at each resume
        self.commands: list[str] = []
        self.capabilities: list[bool] = []
        self.bandwidths: list[int] = []
        self.pending: list[Event] = []
        self.state = "running"
        self.migration = "none"
        self.runstates: list[str] = []  # run states to report before ``state``
        self.clock = 1000.0
        self.chains: dict[str, list[str]] = {}
        self.attached: dict[str, str] = {}
        self.io_status = "ok"
        self.ram = 256 << 20
        self.hung_for: set[str] = set()  # commands that get no answer

    def emit(self, name: str) -> None:
        self.clock += 0.040
        self.pending.append(Event(name, {}, self.clock))

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        self.commands.append(command)
        if command in self.hung_for or "*" in self.hung_for:
            raise StepTimeout(f"QMP {command} got no answer within 30 s")
        answers = {
            "query-migrate": self.query_migrate,
            "query-migrate-capabilities": lambda: [
                {"capability": "background-snapshot", "state": False},
                *([{"capability": "mapped-ram", "state": self.mapped_ram}]
                  if self.mapped_ram is not None else [])],
            "query-qmp-schema": lambda: self.schema,
            "query-fdsets": lambda: [{"fdset-id": i, "fds": [{"fd": 30 + i, "opaque": o}]}
                                     for i, o in self.fdsets.items()],
            "query-migrate-parameters": lambda: {"max-bandwidth": 33554432},
            "query-memory-size-summary": lambda: {"base-memory": self.ram},
            "query-block": self.blocks,
            "query-named-block-nodes": self.nodes,
        }
        if command in answers:
            return answers[command]()
        if command == "migrate-set-capabilities":
            change = arguments["capabilities"][0]
            if change["capability"] == "mapped-ram":
                self.mapped_ram = change["state"]
            else:
                self.capabilities.append(change["state"])
        if command == "remove-fd":
            del self.fdsets[arguments["fdset-id"]]
        if command == "migrate-set-parameters":
            self.bandwidths.append(arguments["max-bandwidth"])
        if command == "migrate":
            self.uris.append(arguments["uri"])
            self._migrate()
        return {}

    def query_migrate(self) -> dict[str, Any]:
        info = {"status": self.migration, "total-time": 2500, "downtime": 7,
                "ram": {"total": 4096, "transferred": 8192, "normal": self.pages,
                        "duplicate": 0}, "error-desc": "boom"}
        if self.on_migrate == "qemu-10" and self.migration == "setup":
            self.migration = "active"  # the next answer: active, no page sent yet
        elif self.on_migrate == "qemu-10" and self.migration == "active":
            self.pages += 1  # then the pages: the capture is done
        return info

    def blocks(self) -> list[dict[str, Any]]:
        return [{"device": device, "io-status": self.io_status,
                 "inserted": {"node-name": f"top-{device}", "file": files[0],
                              "image": nested(files)}}
                for device, files in self.chains.items()]

    def nodes(self) -> list[dict[str, Any]]:
        found = [{"node-name": f"{device}-{depth}", "file": files[depth],
                  "image": nested(files[depth:])}
                 for device, files in self.chains.items() for depth in range(len(files))]
        in_chains = {f for files in self.chains.values() for f in files}
        return found + [{"node-name": node, "file": path, "image": nested([path])}
                        for path, node in self.attached.items() if path not in in_chains]

    def _migrate(self) -> None:
        if self.on_migrate == "fail":
            self.migration = "failed"
            return
        if self.on_migrate == "refuse":  # another migration runs
            raise VMError("QMP migrate failed: There's a migration process in progress")
        if self.on_migrate == "qemu-10":  # leaves the VM paused; "completed" takes a while
            self.migration = "setup"
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

    def add_fd(self, fd: int, opaque: str) -> int:
        self.commands.append(f"add-fd {opaque}")
        fdset = max(self.fdsets, default=-1) + 1
        self.fdsets[fdset] = opaque
        return fdset

    def runstate(self) -> str:
        if "*" in self.hung_for:
            raise StepTimeout("QMP query-status got no answer within 30 s")
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
    """A parent whose disks are chains of image files; records what was asked of it."""

    kind = "fake"

    def __init__(self, monitor: FakeMonitor | None = None, *, running: bool = True) -> None:
        self.monitor = monitor or FakeMonitor()
        self.running = running
        self.calls: list[tuple[str, ...]] = []
        self.fail_snapshot: BaseException | None = None
        self.fail_commit: set[str] = set()
        self.config_pointed: list[str] = []
        self.refusal: str | None = None

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
        self.monitor.resumed_while.append(self.monitor.migration)
        self.monitor.state = "running"
        self.monitor.emit("RESUME")
        if self.monitor.migration == "active":  # the RAM save goes on, then completes
            self.monitor.migration = "completed"

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        self.calls.append(("attach", *(d.overlay_node for d in planned)))
        self.monitor.attached |= {str(d.parent_overlay): d.overlay_node for d in planned}

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        self.calls.append(("detach", *(d.overlay_node for d in planned)))
        in_use = {f for files in self.monitor.chains.values() for f in files}
        for disk in planned:  # blockdev-del refuses a node in use
            if str(disk.parent_overlay) not in in_use:
                self.monitor.attached.pop(str(disk.parent_overlay), None)

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        self.calls.append(("snapshot", *(d.overlay_node for d in planned)))
        if self.fail_snapshot:
            raise self.fail_snapshot
        for disk in planned:
            self.stack(disk)

    def stack(self, disk: ForkedDisk, *above: str) -> None:
        """Put ``disk``'s overlay on top of its disk (and ``above`` on top of that)."""
        chain = self.monitor.chains.setdefault(disk.disk.device, [disk.disk.filename])
        chain[:0] = [*above, str(disk.parent_overlay)]

    def on_top(self) -> set[str]:
        return {files[0] for files in self.monitor.chains.values()}

    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        self.calls.append(("commit", disk.overlay_node))
        if disk.overlay_node in self.fail_commit:
            raise VMError("block-commit failed")
        self.monitor.chains[disk.disk.device].remove(str(disk.parent_overlay))
        return 1000

    def commit_below(self, disk: ForkedDisk, root: str, timeout: float) -> int:
        self.calls.append(("commit-below", disk.overlay_node, root))
        self.monitor.chains[disk.disk.device].remove(str(disk.parent_overlay))
        return 500

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind}

    def online(self) -> bool:
        return self.running

    def offline_refusal(self, disks: Sequence[ForkedDisk]) -> str | None:
        return self.refusal

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


def fork(backend: FakeBackend, tmp_path: Path, method: str = "auto", disks: int = 2,
         **options: Any):
    planned = planned_in(tmp_path, disks)
    for disk in planned:
        disk.frozen.write_bytes(b"frozen")
    (tmp_path / "run").mkdir()
    return planned, engine.take_fork(backend, parent_of(disks, tmp_path), planned,
                                     tmp_path / "run" / "ram.state", method=method, timeout=5,
                                     **options)


def test_the_overlays_are_ready_before_the_pause_and_qemu_72_resumes_by_itself(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-7.2"))
    planned, point = fork(backend, tmp_path)
    nodes = ("kvmsnap-7-1-0", "kvmsnap-7-1-1")
    assert backend.calls == [("attach", *nodes), ("pause",), ("snapshot", *nodes)]
    assert all(d.parent_overlay.exists() for d in planned)
    commands = backend.monitor.commands
    assert commands.index("getfd kvmsnap-state") < commands.index("migrate")
    assert point.method is RamMethod.BACKGROUND
    assert [d.parent_overlay for d in point.disks] == [d.parent_overlay for d in planned]
    assert point.pause_ms == pytest.approx(40.0)  # STOP to RESUME, QEMU's timestamps
    assert (point.ram_bytes, point.ram_save_s, point.qemu_downtime_ms) == (4096, 2.5, 7)
    assert backend.monitor.capabilities == [True, False]  # on for the fork, then put back


def test_the_forked_disks_carry_the_frozen_images_stamps(tmp_path):
    _, point = fork(FakeBackend(), tmp_path)
    for disk in point.disks:
        info = disk.frozen.stat()
        assert disk.frozen_stamp == (info.st_size, info.st_mtime_ns, info.st_ino)


def test_the_migration_settings_are_put_back_and_journaled_until_they_are(tmp_path):
    backend = FakeBackend()
    recorded: list[dict[str, Any]] = []
    fork(backend, tmp_path, record=lambda **fields: recorded.append(fields))
    assert backend.monitor.bandwidths == [1 << 40, 33554432]  # unthrottled, then as it was
    assert recorded == [
        {"migration_settings": {"background-snapshot": False, "max-bandwidth": 33554432}},
        {"migration_started": True},
        {"migration_settings": None, "migration_started": False}]


def test_qemu_9_leaves_the_vm_paused_after_the_capture_so_we_resume_it_once(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-9"))
    _, point = fork(backend, tmp_path)
    assert backend.calls.count(("resume",)) == 1 and backend.monitor.state == "running"
    assert point.method is RamMethod.BACKGROUND


def test_qemu_10_is_resumed_once_a_page_is_sent_not_at_active_nor_at_the_end(tmp_path):
    monitor = FakeMonitor("qemu-10")
    backend = FakeBackend(monitor)
    _, point = fork(backend, tmp_path)
    assert monitor.resumed_while == ["active"]
    polls = monitor.commands[monitor.commands.index("migrate") + 1:]
    assert polls[:3] == ["query-migrate"] * 3  # setup; active with no page: not yet
    assert point.pause_ms == pytest.approx(40.0)  # STOP to our RESUME
    assert monitor.uris == ["fd:kvmsnap-state"]  # the writer's pipe goes as fd:


@pytest.mark.parametrize(("info", "done"), [
    ({"status": "setup"}, False),
    ({"status": "active", "ram": {"transferred": 81920, "normal": 0, "duplicate": 0}}, False),
    ({"status": "active", "ram": {"normal": 0, "duplicate": 3}}, True),
    ({"status": "active", "ram": {"normal": 20, "duplicate": 13}}, True),
    ({"status": "failed", "ram": {"normal": 20}}, False),
])
def test_the_capture_is_done_once_a_ram_page_is_counted(info, done):
    assert ram.capture_done(info) is done


class Refusing(FakeBackend):
    """libvirt refusing to resume a domain it already sees running."""

    def resume(self) -> None:
        self.calls.append(("resume",))
        raise VMError("resuming the domain: Requested operation is not valid")


def test_a_refused_resume_of_a_running_vm_is_no_error():
    backend = Refusing()
    backend.monitor.runstates = ["paused"]  # then running: someone resumed it meanwhile
    ram.resume_after_capture(backend)
    assert backend.calls == [("resume",)]
    backend.monitor.runstates, backend.monitor.state = ["paused"], "paused"
    with pytest.raises(VMError, match="not valid"):
        ram.resume_after_capture(backend)


def test_a_running_vm_is_not_resumed_after_the_capture():
    backend = FakeBackend()
    ram.resume_after_capture(backend)  # QEMU 7.2 did it
    assert backend.calls == []


FILE_TRANSPORT = {"meta-type": "enum", "values": ["socket", "exec", "rdma", "file"]}


def test_stop_and_copy_writes_through_an_fdset_where_qemu_has_file_uris(tmp_path):
    monitor = FakeMonitor("stop-and-copy")
    monitor.schema.append(FILE_TRANSPORT)
    monitor.fdsets = {0: "kvmsnap-state", 1: "libvirt's"}  # one a killed run left
    fork(FakeBackend(monitor), tmp_path, method=RamMethod.STOP_AND_COPY)
    assert monitor.uris == ["file:/dev/fdset/2"]
    assert monitor.fdsets == {1: "libvirt's"}  # ours removed: the stale one and this one
    assert "getfd kvmsnap-state" not in monitor.commands


def test_stop_and_copy_on_qemu_72_uses_fd_uris(tmp_path):
    monitor = FakeMonitor("stop-and-copy")
    fork(FakeBackend(monitor), tmp_path, method=RamMethod.STOP_AND_COPY)
    assert monitor.uris == ["fd:kvmsnap-state"] and monitor.fdsets == {}


def test_a_background_snapshot_never_runs_with_mapped_ram(tmp_path):
    monitor = FakeMonitor("qemu-7.2")
    monitor.mapped_ram = True  # left on by someone else
    recorded: list[dict[str, Any]] = []
    original = monitor.execute

    def watch(command: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        if command == "migrate":
            recorded.append({"mapped-ram": monitor.mapped_ram})
        return original(command, arguments, **kw)

    monitor.execute = watch
    fork(FakeBackend(monitor), tmp_path)
    assert recorded == [{"mapped-ram": False}] and monitor.mapped_ram is True  # put back


def test_stop_and_copy_resumes_only_once_qemu_left_finish_migrate(tmp_path):
    monitor = FakeMonitor("stop-and-copy")
    backend = FakeBackend(monitor)
    _, point = fork(backend, tmp_path, method=RamMethod.STOP_AND_COPY)
    assert monitor.runstates == [] and backend.calls[-1] == ("resume",)
    assert point.method is RamMethod.STOP_AND_COPY and monitor.capabilities == [False, False]
    assert (tmp_path / "run" / "ram.state").exists()


def test_a_stop_and_copy_longer_than_max_pause_is_refused_before_anything(tmp_path):
    monitor = FakeMonitor("stop-and-copy")
    monitor.ram = 8 << 30  # 8 GiB at 256 MiB/s: ~32 s
    backend = FakeBackend(monitor)
    with pytest.raises(VMError, match=r"8192 MiB would pause the VM for about 32\.0 s, more "
                                      r"than the 5 s allowed") as info:
        fork(backend, tmp_path, method=RamMethod.STOP_AND_COPY, max_pause=5)
    assert "--max-pause 32" in info.value.hint and "background snapshot" in info.value.hint
    assert backend.calls == []  # no overlay, no pause
    assert not list(tmp_path.glob("*.kvmsnap-*"))
    assert monitor.bandwidths[-1] == 33554432  # its settings put back


def test_max_pause_does_not_limit_a_background_snapshot(tmp_path):
    monitor = FakeMonitor("qemu-7.2")
    monitor.ram = 64 << 30
    _, point = fork(FakeBackend(monitor), tmp_path, max_pause=1)
    assert point.method is RamMethod.BACKGROUND


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
    assert backend.monitor.bandwidths[-1] == 33554432


def test_a_failure_before_the_disk_snapshot_detaches_and_commits_nothing(tmp_path):
    backend = FakeBackend(FakeMonitor("qemu-7.2"))
    backend.fail_snapshot = VMError("the disk snapshot failed")
    planned = planned_in(tmp_path)
    with pytest.raises(VMError, match="the disk snapshot failed"):
        fork(backend, tmp_path)
    assert not [c for c in backend.calls if c[0] == "commit"]
    assert backend.calls[-2:] == [("resume",), ("detach", "kvmsnap-7-1-0", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)
    assert "migrate_cancel" not in backend.monitor.commands


class LateSnapshot(FakeBackend):
    """The disk snapshot takes in QEMU, but its reply never comes back in time."""

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        self.calls.append(("snapshot", *(d.overlay_node for d in planned)))
        for disk in planned:
            self.stack(disk)
        raise StepTimeout("QMP transaction got no answer within 3 s")


def test_a_snapshot_whose_reply_times_out_but_took_is_committed_back(tmp_path):
    backend = LateSnapshot()
    planned = planned_in(tmp_path)
    with pytest.raises(StepTimeout):
        fork(backend, tmp_path)
    assert [c[0] for c in backend.calls if c[0] == "commit"] == ["commit", "commit"]
    assert not any(d.parent_overlay.exists() for d in planned)
    assert backend.monitor.state == "running"


def test_a_monitor_that_does_not_answer_keeps_every_overlay(tmp_path):
    backend = LateSnapshot()
    backend.monitor.hung_for = {"query-block"}  # asked three times, never answered
    planned = planned_in(tmp_path)
    with pytest.raises(VMError, match="whether the VM's disks moved onto kvmsnap's overlays "
                                      "is unknown: every file is kept") as info:
        fork(backend, tmp_path)
    assert "kvmsnap recover" in info.value.hint
    assert isinstance(info.value.__cause__, StepTimeout)
    assert backend.monitor.commands.count("query-block") == 3
    assert all(d.parent_overlay.exists() for d in planned)  # the VM may write to them
    assert not [c for c in backend.calls if c[0] in ("commit", "detach")]
    assert ("resume",) in backend.calls and backend.monitor.state == "running"


def test_a_snapshot_that_did_not_take_is_detached_and_deleted(tmp_path):
    backend = FakeBackend()
    backend.fail_snapshot = StepTimeout("QMP transaction got no answer within 3 s")
    planned = planned_in(tmp_path)
    with pytest.raises(StepTimeout):
        fork(backend, tmp_path)
    assert backend.calls[-1] == ("detach", "kvmsnap-7-1-0", "kvmsnap-7-1-1")
    assert not any(d.parent_overlay.exists() for d in planned)


def test_a_migration_that_is_not_ours_is_never_settled_or_cancelled(tmp_path):
    monitor = FakeMonitor("refuse")  # someone else's migration started meanwhile
    backend = FakeBackend(monitor)
    with pytest.raises(VMError, match="migration process in progress"):
        fork(backend, tmp_path)
    after = monitor.commands[monitor.commands.index("migrate"):]
    assert "query-migrate" not in after and "migrate_cancel" not in after
    assert backend.monitor.state == "running"  # our pause ended all the same


def test_an_interrupt_with_an_unknown_snapshot_keeps_the_files_and_propagates(tmp_path):
    backend = FakeBackend()
    backend.fail_snapshot = KeyboardInterrupt()
    backend.monitor.hung_for = {"query-named-block-nodes"}
    planned = planned_in(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fork(backend, tmp_path)
    assert all(d.parent_overlay.exists() for d in planned)


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
        parent.check_healthy()  # running: nothing to say
    assert backend.calls == [("closed",)]


def test_a_parent_stopped_on_an_io_error_is_unhealthy(tmp_path):
    backend = FakeBackend()
    backend.stack(planned_in(tmp_path, 1)[0])
    backend.monitor.state = "io-error"
    backend.monitor.io_status = "nospace"
    handle = engine.ParentHandle(backend)
    handle.describe()
    with pytest.raises(HostError, match=rf"web stopped on an I/O error during the backup: no "
                                        rf"space left for .* on the filesystem of {tmp_path}"):
        handle.check_healthy()
