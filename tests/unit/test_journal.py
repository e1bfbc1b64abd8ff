"""The journal: what a run records survives a crash, and one run at a time holds a VM."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import BackupJob, ForkedDisk, ForkOptions, JournalState, ParentDisk, Phase
from kvmsnap_plugin.run.journal import (
    CorruptJournal,
    Journal,
    held_mount,
    journals_naming,
    names_same_vm,
    pending_journal,
    read_state,
    refuse_if_mounted,
    vm_identity,
    vm_key,
)
from kvmsnap_plugin.vm.parent import qemu_uuid
from kvmsnap_plugin.vm.qmp import socket_owner

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
    with pytest.raises(CorruptJournal, match="cannot be read") as info:
        read_state(path)
    assert isinstance(info.value, VMError)
    assert "kvmsnap recover" in info.value.hint and "delete it" in info.value.hint


def test_a_missing_journal_raises_a_vm_error(tmp_path):
    with pytest.raises(VMError, match="cannot be read"):
        read_state(tmp_path / "gone.json")


def test_old_journals_with_unknown_keys_still_read(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"vm": "web", "phase": "forked", "removed_key": 1}')
    assert read_state(path) == JournalState(vm="web", phase=Phase.FORKED)


# -- a corrupt journal blocks nobody else ---------------------------------------------------
def test_a_corrupt_journal_is_set_aside_and_kept(state_dir):
    with Journal.acquire(IDENTITY) as good:
        good.start(vm="web", identity=IDENTITY)
    broken = state_dir / "other-0123456789ab.json"
    broken.write_text("{not json")
    with pytest.raises(CorruptJournal, match="cannot be read") as info:
        Journal.acquire_file(broken, quarantine=True)
    kept = state_dir / "other-0123456789ab.json.corrupt"
    assert f"kept as {kept}" in str(info.value) and "by hand" in info.value.hint
    assert kept.read_text() == "{not json" and not broken.exists()
    assert Journal.all_pending() == [good.path]  # out of every later run's way
    assert not (state_dir / "other-0123456789ab.lock").exists()
    broken.write_text("[]")  # a second one never overwrites the first
    with pytest.raises(CorruptJournal):
        Journal.acquire_file(broken, quarantine=True)
    assert kept.read_text() == "{not json" and len(list(state_dir.glob("*.corrupt"))) == 2


def test_without_quarantine_a_corrupt_journal_refuses_and_stays(state_dir):
    path = state_dir / f"{vm_key(IDENTITY)}.json"
    state_dir.mkdir(mode=0o700)
    path.write_text("{not json")
    with pytest.raises(CorruptJournal):
        Journal.acquire(IDENTITY)
    assert path.exists()
    with pytest.raises(CorruptJournal):  # the lock was given back
        Journal.acquire(IDENTITY)


# -- the lock is the VM's ------------------------------------------------------------------
def test_journals_of_older_versions_keep_their_names():
    assert vm_key("/run/qemu/web.qmp").startswith("web-")
    assert vm_key("qemu:123:456:boot").startswith("qemu-")
    assert vm_key("qemu:123:456:boot") != vm_key("qemu:123:457:boot")


@pytest.fixture
def listening(tmp_path):
    import socket

    path = tmp_path / "vm.qmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        yield path


def test_the_listener_of_a_socket_is_found_without_being_accepted(listening, tmp_path):
    assert socket_owner(listening) == os.getpid()
    link = tmp_path / "link.qmp"
    link.symlink_to(listening)
    assert socket_owner(link) == os.getpid()
    with pytest.raises(VMError, match="no such QMP socket"):
        socket_owner(tmp_path / "gone.qmp")
    (tmp_path / "file.qmp").write_text("")
    with pytest.raises(VMError, match="cannot connect"):
        socket_owner(tmp_path / "file.qmp")


def test_a_bare_qemu_is_keyed_on_its_process(listening, tmp_path):
    job = BackupJob("web", listening)
    assert vm_identity(job) == f"qemu:{process.identity(os.getpid())}"
    link = tmp_path / "link.qmp"
    link.symlink_to(listening)
    assert vm_identity(BackupJob("other name", link)) == vm_identity(job)
    assert qemu_uuid(os.getpid()) is None


def test_the_listener_is_found_without_a_connection_it_would_have_to_drop(listening):
    """QMP serves one client; the others wait in a short queue (QEMU's backlog is 1):
    asking must not take a place in it."""
    import socket

    for _ in range(4):
        assert socket_owner(listening) == os.getpid()
    with socket.socket(socket.AF_UNIX) as probe:  # the queue is still empty
        probe.settimeout(1)
        probe.connect(str(listening))


def test_a_socket_held_by_several_processes_is_asked_by_connecting(listening):
    child = os.fork()  # the child holds the listening socket too
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        time.sleep(0.2)
        assert socket_owner(listening) == os.getpid()  # the one that listened
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_the_uuid_is_read_from_the_command_line(tmp_path):
    proc = process.spawn(["python3", "-c", "import time; time.sleep(30)", "-uuid",
                          "3F2504E0-4F89-11D3-9A0C-0305E82C3301"])
    try:
        time.sleep(0.2)
        assert qemu_uuid(proc.pid) == "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
        job = BackupJob("web", tmp_path / "unused.qmp", ForkOptions(pid=proc.pid))
        assert vm_identity(job) == "qemu-uuid:3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    finally:
        process.end(proc)


def test_a_journal_names_its_vm_by_socket_or_domain(tmp_path):
    link = tmp_path / "link.qmp"
    link.symlink_to(tmp_path / "vm.qmp")
    state = JournalState(qmp=str(tmp_path / "vm.qmp"))
    assert names_same_vm(state, BackupJob("x", link))
    assert not names_same_vm(state, BackupJob("x", tmp_path / "other.qmp"))
    state = JournalState(backend="libvirt", domain="web", libvirt_uri="qemu:///system")
    assert names_same_vm(state, BackupJob("web", None, domain="web"))
    assert not names_same_vm(state, BackupJob("web", None, domain="web",
                                              libvirt_uri="qemu:///session"))


def test_release_finds_the_journal_of_a_vm_that_is_gone(state_dir, tmp_path):
    socket_path = tmp_path / "gone.qmp"
    with Journal.acquire("qemu:1:2:old-boot") as journal:
        journal.start(vm="web", identity="qemu:1:2:old-boot", qmp=str(socket_path),
                      phase=Phase.MOUNTED)
    job = BackupJob("web", socket_path)
    assert journals_naming(job) == [journal.path]
    found = pending_journal(job)
    assert found is not None and found.path == journal.path and found.pending
    found.release()
    assert pending_journal(BackupJob("web", tmp_path / "never.qmp")) is None


# -- a split backup still mounted is its reader's ------------------------------------------
def test_a_mounted_split_backup_is_held_while_its_mounts_are_there():
    mounted = JournalState(phase=Phase.MOUNTED, boot=process.boot_id(), mounts=("/proc",),
                           mount_root="/var/tmp/kvmsnap/mnt/web")
    assert held_mount(mounted) == "/var/tmp/kvmsnap/mnt/web"
    assert held_mount(mounted.updated(mount_root=None)) == "/proc"
    # stale: its mounts are gone, or it is from a previous boot
    assert held_mount(mounted.updated(mounts=("/nonexistent/mnt",))) is None
    assert held_mount(mounted.updated(boot="an-earlier-boot")) is None
    # a run that is not a split backup is never held
    assert held_mount(mounted.updated(phase=Phase.EXPOSED)) is None
    # journals of older versions have no boot: their mounts decide
    assert held_mount(mounted.updated(boot=None)) == "/var/tmp/kvmsnap/mnt/web"


def test_a_started_run_records_the_boot(state_dir):
    with Journal.acquire(IDENTITY) as journal:
        journal.start(vm="web", identity=IDENTITY)
        assert read_state(journal.path).boot == process.boot_id()


def test_a_run_is_refused_while_a_split_backup_of_its_vm_is_mounted(state_dir, tmp_path):
    socket_path = tmp_path / "vm.qmp"
    job = BackupJob("web", socket_path)
    held = dict(vm="web", qmp=str(socket_path), phase=Phase.MOUNTED, mounts=["/proc"],
                mount_root="/mnt/web")
    with Journal.acquire("qemu:1:2:boot") as journal:
        refuse_if_mounted(job, journal)  # nothing recorded: nothing to refuse
        journal.start(identity="qemu:1:2:boot", **held)
        with pytest.raises(VMError, match="still mounted at /mnt/web") as info:
            refuse_if_mounted(job, journal)
        assert info.value.hint == "run `kvmsnap release` first"
    # ... also when its journal is under another key (an older kvmsnap, a restarted QEMU)
    with Journal.acquire("qemu:3:4:boot") as other, pytest.raises(VMError, match="mounted"):
        refuse_if_mounted(job, other)
    with Journal.acquire("qemu:1:2:boot") as journal:
        journal.record(mounts=["/nonexistent/mnt"])  # its mounts are gone: stale
    with Journal.acquire("qemu:3:4:boot") as other:
        refuse_if_mounted(job, other)
