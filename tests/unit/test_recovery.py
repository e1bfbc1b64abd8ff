"""Giving the parent its chain back from a journal: the decisions, against a fake backend."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from test_fork_engine import FakeBackend, FakeMonitor, planned_in

from kvmsnap_plugin.backends.libvirt import LibvirtBackend
from kvmsnap_plugin.backends.qmp import RECOVERY_CONNECT_TIMEOUT, TEST_TIMEOUT_ENV, QmpBackend
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.fork import chain, ram, recovery
from kvmsnap_plugin.model import JournalState, Phase, Recovery


@pytest.fixture
def backend(monkeypatch):
    """The parent recovery reopens; its QEMU is the one the journal names."""
    fake = FakeBackend(FakeMonitor())
    monkeypatch.setattr(recovery, "reopen", lambda state: fake)
    monkeypatch.setattr(recovery.process, "same_process", lambda recorded: 4242)
    return fake


def journal(tmp_path, phase, disks=2, **fields):
    planned = planned_in(tmp_path, disks)
    for disk in planned:
        disk.parent_overlay.write_bytes(b"writes")
    return JournalState(vm="web", phase=phase, parent="4242:99", overlays=planned, **fields)


def test_a_parent_left_paused_mid_fork_is_resumed_after_its_ram_snapshot_ends(backend,
                                                                             tmp_path):
    state = journal(tmp_path, Phase.FORKING, migration_started=True)
    backend.monitor.state = "paused"
    backend.monitor.migration = "active"
    backend.monitor.execute = settle_after(backend.monitor, queries=2)
    result = Recovery("web")
    recovery.give_back(state, result)
    assert result.actions == ["let an unfinished RAM snapshot end (completed)",
                              "resumed the parent (it was paused)",
                              "deleted the unused overlay d0.qcow2.kvmsnap-7-1.qcow2",
                              "deleted the unused overlay d1.qcow2.kvmsnap-7-1.qcow2"]
    assert backend.monitor.state == "running" and backend.monitor.capabilities == [False]


def test_a_migration_kvmsnap_did_not_start_is_left_alone(backend, tmp_path):
    state = journal(tmp_path, Phase.FORKING)  # killed before its RAM snapshot began
    backend.monitor.state = "postmigrate"  # someone else's migration moved the VM away
    backend.monitor.migration = "active"
    result = Recovery("web")
    recovery.give_back(state, result)
    assert result.actions[0] == "left alone a migration that kvmsnap did not start"
    assert "migrate_cancel" not in backend.monitor.commands
    assert ("resume",) not in backend.calls  # running it here too would run it twice


def test_the_journaled_migration_settings_are_put_back(backend, tmp_path):
    state = journal(tmp_path, Phase.FORKED, migration_settings={
        "background-snapshot": False, "max-bandwidth": 1234})
    result = Recovery("web")
    recovery.give_back(state, result)
    assert backend.monitor.bandwidths == [1234] and backend.monitor.capabilities == [False]
    assert result.actions[-1] == "put the VM's migration settings back"


def settle_after(monitor, queries):
    """``query-migrate`` answers "active" ``queries`` times, then "completed"."""
    real = monitor.execute

    def execute(command, arguments=None, *, timeout=None):
        answer = real(command, arguments, timeout=timeout)
        if command == "query-migrate":
            monitor.migration = "active" if monitor.commands.count(command) < queries \
                else "completed"
        return answer

    return execute


def test_overlays_are_given_back_where_they_are_and_unused_ones_deleted(backend, tmp_path):
    state = journal(tmp_path, Phase.EXPOSED, disks=3)  # a run killed while archiving
    backend.stack(state.overlays[1])
    backend.stack(state.overlays[2], str(tmp_path / "admin.qcow2"))
    result = Recovery("web")
    recovery.give_back(state, result)
    assert result.actions == ["deleted the unused overlay d0.qcow2.kvmsnap-7-1.qcow2",
                              "committed the parent's overlay of vdb back",
                              "committed the parent's overlay of vdc back through the middle "
                              "of its chain (another snapshot sits on top of it)"]
    assert ("detach", state.overlays[0].overlay_node) in backend.calls
    assert not any(d.parent_overlay.exists() for d in state.overlays)


def test_a_monitor_that_does_not_answer_fails_recovery_and_keeps_everything(backend,
                                                                          tmp_path):
    state = journal(tmp_path, Phase.FORKED)
    backend.monitor.hung_for = {"query-block"}
    with pytest.raises(VMError, match="vda: QMP query-block got no answer"):
        recovery.give_back(state, Recovery("web"))
    assert all(d.parent_overlay.exists() for d in state.overlays)


def test_a_parent_stopped_on_an_io_error_is_committed_and_resumed(backend, tmp_path):
    state = journal(tmp_path, Phase.EXPOSED, disks=1)
    backend.stack(state.overlays[0])
    backend.monitor.state = "io-error"
    backend.monitor.io_status = "nospace"
    result = Recovery("web")
    recovery.give_back(state, result)
    assert result.actions[-1].startswith("the VM had stopped on an I/O error (no space left")
    assert backend.monitor.state == "running"


def test_after_the_fork_a_paused_parent_is_not_ours_to_resume(backend, tmp_path):
    backend.monitor.state = "paused"  # paused by its owner after our fork ended
    recovery.give_back(journal(tmp_path, Phase.FORKED), Recovery("web"))
    assert ("resume",) not in backend.calls and backend.monitor.state == "paused"


def test_a_parent_whose_qemu_is_gone_is_committed_offline(backend, tmp_path, monkeypatch):
    backend.running = False
    ran = []

    def run(argv, timeout):
        ran.append([str(a) for a in argv])
        return type("Done", (), {"stdout": '[{"depth": 0}]'})

    monkeypatch.setattr(chain.process, "run", run)
    state = journal(tmp_path, Phase.FORKED)
    for disk in state.overlays:
        disk.frozen.write_bytes(b"frozen")
    state = state.updated(overlays=[replace(d, frozen_stamp=chain.stamp_of(d.frozen))
                                    for d in state.overlays])
    result = Recovery("web")
    recovery.give_back(state.updated(domain="web"), result)
    assert [argv[1] for argv in ran] == ["map", "commit", "map", "commit"]
    assert backend.config_pointed == ["vda", "vdb"]
    assert result.actions[-1] == "pointed the configuration of web back at its images " \
                                 "(vda, vdb)"
    assert not any(d.parent_overlay.exists() for d in state.overlays)
    assert backend.monitor.commands == []  # no monitor: its QEMU is gone


def test_a_domain_that_is_only_suspended_is_not_committed_offline(backend, tmp_path):
    backend.running = False
    backend.refusal = "domain web is not shut off but managed-saved"
    state = journal(tmp_path, Phase.FORKED)
    with pytest.raises(VMError, match="managed-saved: its overlays hold writes it still "
                                      "needs and are kept") as info:
        recovery.give_back(state, Recovery("web"))
    assert "kvmsnap recover" in info.value.hint
    assert all(d.parent_overlay.exists() for d in state.overlays)
    assert backend.config_pointed == []


def test_a_run_that_gave_the_chain_back_leaves_the_monitor_alone(backend, tmp_path):
    state = JournalState(vm="web", phase=Phase.EXPOSED, overlays=())
    recovery.give_back(state, Recovery("web"))
    assert backend.calls == [] and backend.monitor.commands == []


def test_the_journal_says_which_backend_to_reopen(tmp_path):
    gone = JournalState(backend="qmp", qmp=str(tmp_path / "no.sock"), parent="1:1")
    with recovery.reopen(gone) as qmp:  # its QEMU is gone: no connection is tried
        assert isinstance(qmp, QmpBackend) and not qmp.online()
    domain = recovery.reopen(JournalState(backend="libvirt", domain="web", uuid="u-1",
                                          libvirt_uri="qemu:///session"))
    assert isinstance(domain, LibvirtBackend)
    assert (domain.domain, domain.uuid, domain.uri) == ("web", "u-1", "qemu:///session")


def test_the_tests_shorter_qmp_timeout_cuts_recoverys_connect_too(tmp_path, monkeypatch):
    """A stopped QEMU's socket takes the connection but never greets: a failed fork's final
    sweep waited the full 30 s on it though the test had cut QMP's timeouts to 3 s."""
    state = JournalState(backend="qmp", qmp=str(tmp_path / "no.sock"), parent="1:1")
    monkeypatch.delenv(TEST_TIMEOUT_ENV, raising=False)
    with recovery.reopen(state) as qmp:
        assert qmp.connect_timeout == RECOVERY_CONNECT_TIMEOUT
    monkeypatch.setenv(TEST_TIMEOUT_ENV, "3")
    with recovery.reopen(state) as qmp:
        assert qmp.connect_timeout == 3.0


def test_settings_that_cannot_be_put_back_stay_in_the_journal(backend, tmp_path):
    """recover reports a problem (so the journal keeps them and the next recover retries)
    instead of forgetting settings it could not restore."""
    state = journal(tmp_path, Phase.FORKED, migration_settings={
        "background-snapshot": False, "max-bandwidth": 1234})
    backend.monitor.hung_for = {"migrate-set-parameters"}
    with pytest.raises(VMError, match="migration settings back"):
        recovery.give_back(state, Recovery("web"))


def test_a_live_qemu_whose_socket_cannot_be_seen_is_not_taken_for_shut_off(tmp_path):
    """(e.g. recover run in a private /tmp): offline recovery would commit or unlink the
    overlay the running VM writes to."""
    from kvmsnap_plugin.backends import qmp
    from kvmsnap_plugin.host import process

    state = journal(tmp_path, Phase.FORKED, qmp=str(tmp_path / "gone.qmp"))
    state = replace(state, parent=process.identity(os.getpid()))  # alive: this process
    with pytest.raises(VMError, match="still runs but its QMP socket"):
        qmp.reopen(state)
    assert all(disk.parent_overlay.exists() for disk in state.overlays)


class Transferring(FakeMonitor):
    """A RAM snapshot that moves ``rate`` bytes per query for ``queries`` queries, then
    stops moving, and never ends by itself."""

    def __init__(self, rate: int, queries: int) -> None:
        super().__init__()
        self.migration, self.rate, self.queries, self.moved = "active", rate, queries, 0

    def execute(self, command, arguments=None, *, timeout=None):
        answer = super().execute(command, arguments, timeout=timeout)
        if command == "query-migrate":
            if self.queries > 0:
                self.queries -= 1
                self.moved += self.rate
            answer["ram"] = {"transferred": self.moved}
        if command == "migrate_cancel":
            self.migration = "cancelled"
        return answer


def test_a_slow_ram_snapshot_that_makes_progress_is_never_cancelled():
    monitor = Transferring(rate=1 << 20, queries=12)  # ~0.6 s of progress, stall 0.3 s
    monitor.execute = _ends_after(monitor, queries=12)
    assert ram.settle_migration(monitor, stall=0.3) == "completed"
    assert "migrate_cancel" not in monitor.commands


def test_a_ram_snapshot_that_stops_moving_is_cancelled():
    monitor = Transferring(rate=1 << 20, queries=3)
    assert ram.settle_migration(monitor, stall=0.3) == "cancelled"
    assert monitor.commands.count("migrate_cancel") == 1


def _ends_after(monitor, queries):
    real = monitor.execute

    def execute(command, arguments=None, *, timeout=None):
        answer = real(command, arguments, timeout=timeout)
        if command == "query-migrate" and monitor.commands.count(command) >= queries:
            monitor.migration = answer["status"] = "completed"
        return answer

    return execute
