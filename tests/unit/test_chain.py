"""The commit back: every disk attempted, an overlay deleted only once it holds nothing."""

from __future__ import annotations

import pytest
from test_fork_engine import FakeBackend, planned_in

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.fork import chain
from kvmsnap_plugin.model import Recovery


def with_files(tmp_path, disks=3):
    planned = planned_in(tmp_path, disks)
    for disk in planned:
        disk.parent_overlay.write_bytes(b"writes")
    return planned


def test_active_overlays_are_committed_then_detached_and_deleted(tmp_path):
    backend = FakeBackend()
    planned = with_files(tmp_path, 2)
    backend.on_top = {planned[0].overlay_node}  # the other one never became a layer
    commits = chain.commit_back(backend, planned)
    assert [(c.device, c.bytes) for c in commits] == [("vda", 1000), ("vdb", 0)]
    assert backend.calls == [("commit", "kvmsnap-7-1-0"), ("detach", "kvmsnap-7-1-0"),
                             ("detach", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)


def test_every_disk_is_attempted_and_all_failures_are_reported_together(tmp_path):
    backend = FakeBackend()
    planned = with_files(tmp_path, 3)
    backend.on_top = {d.overlay_node for d in planned}
    backend.fail_commit = {planned[0].overlay_node, planned[2].overlay_node}
    with pytest.raises(VMError) as info:
        chain.commit_back(backend, planned)
    assert [c[1] for c in backend.calls if c[0] == "commit"] == [d.overlay_node for d in planned]
    assert "vda: block-commit failed" in str(info.value)
    assert "vdc: block-commit failed" in str(info.value) and "vdb" not in str(info.value)
    assert "kvmsnap recover" in info.value.hint
    # a failed commit keeps its overlay: it still holds the guest's writes
    assert [d.parent_overlay.exists() for d in planned] == [True, False, True]


def test_delete_overlay_says_whether_there_was_one(tmp_path):
    disk = with_files(tmp_path, 1)[0]
    assert chain.delete_overlay(disk) is True
    assert chain.delete_overlay(disk) is False and not disk.parent_overlay.exists()


def test_offline_commit_folds_each_existing_overlay_into_its_image(tmp_path, monkeypatch):
    planned = with_files(tmp_path, 2)
    planned[1].parent_overlay.unlink()  # committed by an earlier, interrupted recovery
    ran = []
    monkeypatch.setattr(chain.process, "run", lambda argv, timeout: ran.append(argv))
    result = Recovery("web")
    chain.commit_offline(planned, result)
    assert ran == [["qemu-img", "commit", "-q", "-f", "qcow2", planned[0].parent_overlay]]
    assert not planned[0].parent_overlay.exists()
    assert result.actions == [f"committed {planned[0].parent_overlay.name} into d0.qcow2 "
                              "offline (the VM was not running)"]
