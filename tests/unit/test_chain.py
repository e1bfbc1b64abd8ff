"""The commit back: each overlay given back where QEMU's block graph says it is, and deleted
only once no node names it; offline only onto an unchanged frozen image."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from test_fork_engine import FakeBackend, nested, planned_in

from kvmsnap_plugin.errors import HostError, VMError
from kvmsnap_plugin.fork import chain
from kvmsnap_plugin.model import ForkedDisk, Recovery


def with_files(tmp_path, disks=3):
    planned = planned_in(tmp_path, disks)
    for disk in planned:
        disk.parent_overlay.write_bytes(b"writes")
        disk.frozen.write_bytes(b"frozen")
    return planned


def test_active_overlays_are_committed_then_detached_and_deleted(tmp_path):
    backend = FakeBackend()
    planned = with_files(tmp_path, 2)
    backend.stack(planned[0])  # the other one never became a layer
    commits = chain.commit_back(backend, planned)
    assert [(c.device, c.bytes, c.layer) for c in commits] == [("vda", 1000, "active"),
                                                              ("vdb", 0, "unused")]
    assert backend.calls == [("commit", "kvmsnap-7-1-0"), ("detach", "kvmsnap-7-1-0"),
                             ("detach", "kvmsnap-7-1-1")]
    assert not any(d.parent_overlay.exists() for d in planned)


def test_an_overlay_under_another_snapshot_is_committed_through_the_middle(tmp_path):
    backend = FakeBackend()
    [disk] = with_files(tmp_path, 1)
    admin = str(tmp_path / "admin.qcow2")
    backend.stack(disk, admin)  # an admin's snapshot on top of ours, mid-backup
    [commit] = chain.commit_back(backend, [disk])
    assert (commit.layer, commit.bytes) == ("below", 500)
    assert backend.calls[0] == ("commit-below", disk.overlay_node, "top-vda")
    assert backend.monitor.chains["vda"] == [admin, str(disk.frozen)]
    assert not disk.parent_overlay.exists()


def test_an_overlay_a_node_still_names_is_never_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(chain, "RELEASE_WAIT", 0.2)
    backend = FakeBackend()
    [disk] = with_files(tmp_path, 1)
    backend.stack(disk)
    backend.commit_one = lambda d, timeout: 0  # "committed", but QEMU still has it on top
    with pytest.raises(VMError, match=r"vda: kept .* still use it") as info:
        chain.commit_back(backend, [disk])
    assert "kvmsnap recover" in info.value.hint
    assert disk.parent_overlay.exists()


def test_an_overlay_only_a_stray_node_names_is_kept(tmp_path):
    backend = FakeBackend()
    [disk] = with_files(tmp_path, 1)
    stray = {"node-name": "stray", "file": "/x.qcow2",
             "image": nested(["/x.qcow2", str(disk.parent_overlay)])}
    nodes = backend.monitor.nodes
    backend.monitor.nodes = lambda: [*nodes(), stray]
    with pytest.raises(VMError, match=r"backing file of block node.s. stray, which no disk uses"):
        chain.commit_back(backend, [disk])
    assert disk.parent_overlay.exists() and not [c for c in backend.calls if "commit" in c[0]]


def test_every_disk_is_attempted_and_all_failures_are_reported_together(tmp_path):
    backend = FakeBackend()
    planned = with_files(tmp_path, 3)
    for disk in planned:
        backend.stack(disk)
    backend.fail_commit = {planned[0].overlay_node, planned[2].overlay_node}
    with pytest.raises(VMError) as info:
        chain.commit_back(backend, planned)
    assert [c[1] for c in backend.calls if c[0] == "commit"] == [d.overlay_node for d in planned]
    assert "vda: block-commit failed" in str(info.value)
    assert "vdc: block-commit failed" in str(info.value) and "vdb" not in str(info.value)
    assert "kvmsnap recover" in info.value.hint
    # a failed commit keeps its overlay: it still holds the guest's writes
    assert [d.parent_overlay.exists() for d in planned] == [True, False, True]


def test_a_parent_stopped_on_a_full_disk_is_committed_first_then_resumed(tmp_path):
    backend = FakeBackend()
    [disk] = with_files(tmp_path, 1)
    backend.stack(disk)
    backend.monitor.state = "io-error"
    backend.monitor.io_status = "nospace"
    with pytest.raises(HostError, match=rf"stopped on an I/O error during the backup: no space "
                                        rf"left for .* on the filesystem of {tmp_path}, \d+ MiB "
                                        "free"):
        chain.commit_back(backend, [disk])
    assert [c[0] for c in backend.calls] == ["commit", "detach", "resume"]
    assert backend.monitor.state == "running" and not disk.parent_overlay.exists()


def test_a_failed_commit_of_a_stopped_parent_says_it_is_still_paused(tmp_path):
    backend = FakeBackend()
    [disk] = with_files(tmp_path, 1)
    backend.stack(disk)
    backend.fail_commit = {disk.overlay_node}
    backend.monitor.state = "io-error"
    backend.monitor.io_status = "nospace"
    with pytest.raises(VMError, match="the VM is paused on an I/O error"):
        chain.commit_back(backend, [disk])
    assert ("resume",) not in backend.calls and disk.parent_overlay.exists()


def test_where_an_overlay_is_read_from_qemus_answers():
    overlay = Path("/img/d.qcow2.kvmsnap-1.qcow2")
    blocks = [{"inserted": {"node-name": "admin", "file": "/img/admin.qcow2",
                            "image": nested(["/img/admin.qcow2", str(overlay), "/img/d.qcow2"])}}]
    assert chain.place_in(overlay, blocks, []) == chain.Place(chain.Layer.BELOW, "admin")
    blocks[0]["inserted"]["image"] = nested([str(overlay), "/img/d.qcow2"])
    assert chain.place_in(overlay, blocks, []).layer is chain.Layer.ACTIVE
    blocks[0]["inserted"]["image"] = nested(["/img/d.qcow2"])
    assert chain.place_in(overlay, blocks, []).layer is chain.Layer.UNUSED
    assert chain.names(f'json:{{"file": {{"filename": "{overlay}"}}}}', overlay)


def test_delete_overlay_says_whether_there_was_one(tmp_path):
    disk = with_files(tmp_path, 1)[0]
    assert chain.delete_overlay(disk, FakeBackend().monitor) is True
    assert chain.delete_overlay(disk, None) is False and not disk.parent_overlay.exists()


# -- offline ---------------------------------------------------------------------------------------
@pytest.fixture
def qemu_img(monkeypatch):
    """``qemu-img map`` says whether an overlay holds clusters (files holding "writes" do);
    ``qemu-img commit`` is recorded."""
    ran = []

    def run(argv, timeout):
        ran.append([str(a) for a in argv])
        writes = Path(argv[-1]).read_bytes() == b"writes"
        extents = [{"start": 0, "length": 65536, "depth": 0 if writes else 1, "data": True}]
        return type("Done", (), {"stdout": json.dumps(extents)})

    monkeypatch.setattr(chain.process, "run", run)
    return ran


def stamped(disk):
    return replace(disk, frozen_stamp=chain.stamp_of(disk.frozen))


def test_offline_commit_folds_each_overlay_with_writes_into_its_unchanged_image(tmp_path,
                                                                              qemu_img):
    planned = [stamped(d) for d in with_files(tmp_path, 3)]
    planned[1].parent_overlay.unlink()  # committed by an earlier, interrupted recovery
    planned[2].parent_overlay.write_bytes(b"empty")  # a qemu-img commit emptied it
    result = Recovery("web")
    chain.commit_offline(planned, result)
    assert [argv[:2] for argv in qemu_img] == [["qemu-img", "map"], ["qemu-img", "commit"],
                                               ["qemu-img", "map"]]
    assert qemu_img[1][-1] == str(planned[0].parent_overlay)
    assert result.actions == [f"committed {planned[0].parent_overlay.name} into d0.qcow2 "
                              "offline (the VM was not running)"]


def test_offline_commit_refuses_a_frozen_image_that_changed_after_the_fork(tmp_path, qemu_img):
    [disk] = [stamped(d) for d in with_files(tmp_path, 1)]
    disk.frozen.write_bytes(b"the VM ran on its image again")
    os.utime(disk.frozen, ns=(1, disk.frozen_stamp[1] + 10**9))
    with pytest.raises(VMError, match=r"d0.qcow2 changed after the fork .* would overwrite "
                                      "newer data") as info:
        chain.commit_offline([disk], Recovery("web"))
    assert "keep both files" in info.value.hint and "qemu-img commit" in info.value.hint
    assert [argv[1] for argv in qemu_img] == ["map"] and disk.parent_overlay.exists()


def test_offline_commit_refuses_without_a_stamp_but_drops_an_empty_overlay(tmp_path, qemu_img):
    full, empty = with_files(tmp_path, 2)
    empty.parent_overlay.write_bytes(b"empty")
    with pytest.raises(VMError, match=r"cannot prove .*d0.qcow2 unchanged since the fork"):
        chain.commit_offline([full, empty], Recovery("web"))
    assert [argv[1] for argv in qemu_img] == ["map", "map"]  # no commit at all


def test_the_stamp_survives_the_journal(tmp_path):
    [disk] = [stamped(d) for d in with_files(tmp_path, 1)]
    again = ForkedDisk.from_dict(json.loads(json.dumps(disk.as_dict())))
    assert again == disk and again.frozen_stamp == chain.stamp_of(disk.frozen)
    assert ForkedDisk.from_dict({**disk.as_dict(), "frozen_stamp": None}).frozen_stamp is None
