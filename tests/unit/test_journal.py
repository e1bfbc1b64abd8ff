"""The journal: what a run records survives a crash, and one run at a time holds a VM."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import ForkedDisk, JournalState, ParentDisk, Phase
from kvmsnap_plugin.run.journal import Journal, read_state, vm_key

IDENTITY = "/run/qemu/web.qmp"


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "state"
    monkeypatch.setenv("KVMSNAP_STATE_DIR", str(directory))
    return directory


def overlay(index: int) -> ForkedDisk:
    disk = ParentDisk(f"vdisk{index}", f"node{index}", f"/images/d{index}.qcow2", "qcow2",
                      1 << 30, False, (f"/images/d{index}.qcow2", "/images/base.raw"))
    return ForkedDisk(disk, Path(f"/images/d{index}.qcow2.kvmsnap-1-2.qcow2"),
                      f"kvmsnap-1-2-{index}")


def test_what_is_recorded_reads_back_the_same(state_dir):
    with Journal.acquire(IDENTITY) as journal:
        journal.start(vm="web", identity=IDENTITY, phase=Phase.PREPARING)
        journal.record(phase=Phase.FORKING, overlays=[overlay(0), overlay(1)],
                       workdir="/var/tmp/kvmsnap/run-web-x")
        journal.append("mounts", "/mnt/a")
        journal.append("mounts", "/mnt/b")
        journal.discard("mounts", "/mnt/a")
        state = read_state(journal.path)
    assert state == journal.current
    assert state.overlays == (overlay(0), overlay(1))
    assert isinstance(state.overlays[0], ForkedDisk) and state.phase is Phase.FORKING
    assert state.overlays[0].disk.chain == ("/images/d0.qcow2", "/images/base.raw")
    assert state.mounts == ("/mnt/b",) and state.pid == os.getpid()


def test_the_journal_is_written_whole_and_private(state_dir):
    with Journal.acquire(IDENTITY) as journal:
        journal.start(vm="web", identity=IDENTITY)
        journal.record(clone="123:456")
        assert sorted(p.name for p in state_dir.iterdir()) == \
            [f"{vm_key(IDENTITY)}.json", f"{vm_key(IDENTITY)}.lock"]  # no temporary file left
        assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_a_second_run_on_the_same_vm_is_refused_naming_the_first(state_dir):
    with Journal.acquire(IDENTITY):
        with pytest.raises(VMError, match=f"pid {os.getpid()}"):
            Journal.acquire(IDENTITY)
        with Journal.acquire("/run/qemu/other.qmp"):  # another VM: its own lock
            pass
    with Journal.acquire(IDENTITY):  # released: free again
        pass


def test_finish_forgets_the_run_and_release_leaves_no_file(state_dir):
    journal = Journal.acquire(IDENTITY)
    journal.start(vm="web", identity=IDENTITY)
    assert journal.pending and journal.path.exists()
    journal.finish()
    assert not journal.pending and not journal.path.exists()
    journal.release()
    assert list(state_dir.iterdir()) == []


def test_an_unfinished_run_keeps_its_journal_for_recovery(state_dir):
    with Journal.acquire(IDENTITY) as journal:
        journal.start(vm="web", identity=IDENTITY, phase=Phase.EXPOSED)
    assert Journal.all_pending() == [journal.path]
    with Journal.acquire(IDENTITY) as again:
        assert again.pending and again.current.phase is Phase.EXPOSED


def test_an_unknown_field_is_refused(state_dir):
    with Journal.acquire(IDENTITY) as journal:
        journal.start(vm="web", identity=IDENTITY)
        with pytest.raises(TypeError):
            journal.record(no_such_field=1)
        assert read_state(journal.path) == journal.current  # nothing half-written


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"phase": "no-such-phase"}',
                                     '{"overlays": [{"disk": {}}]}'])
def test_a_corrupt_journal_raises_a_vm_error(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(VMError, match="cannot be read") as info:
        read_state(path)
    assert "delete it" in info.value.hint


def test_a_missing_journal_raises_a_vm_error(tmp_path):
    with pytest.raises(VMError, match="cannot be read"):
        read_state(tmp_path / "gone.json")


def test_old_journals_with_unknown_keys_still_read(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"vm": "web", "phase": "forked", "removed_key": 1}')
    assert read_state(path) == JournalState(vm="web", phase=Phase.FORKED)
