"""kvmsnap-vm.json: what an archive says about its VM, written at backup, read at restore."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from kvmsnap_plugin.model import (
    ForkedDisk,
    ForkPoint,
    Label,
    Parent,
    ParentDisk,
    RamMethod,
    RecordedDisk,
    VmRecord,
)
from kvmsnap_plugin.run.metadata import record_of

ROOT = ParentDisk("vda", "n0", "/images/web.qcow2", "qcow2", 8 << 30, False,
                  ("/images/web.qcow2",))
SEED = ParentDisk("vdb", "n1", "/images/seed.iso", "raw", 1 << 20, True, ("/images/seed.iso",))
PARENT = Parent(Path("/run/web.qmp"), 4242, "web",
                ("qemu-system-x86_64", "-m", "1024", "-drive", "file=/images/web.qcow2"),
                (8, 2, 0), (ROOT, SEED))


def point() -> ForkPoint:
    forked = ForkedDisk(ROOT, Path("/images/web.qcow2.kvmsnap-1-2.qcow2"), "kvmsnap-1-2-0")
    return ForkPoint(PARENT, (forked,), Path("/work/ram.state"), RamMethod.BACKGROUND,
                     12.5, 1.5, 3.0, 1 << 30, 9)


def test_the_record_of_a_fork_names_the_vm_its_writable_disks_and_command_line():
    before = datetime.now(UTC).replace(microsecond=0)
    record = record_of(point(), "1-2", Label.CLEAN, "web")
    assert record.vm == "web" and record.run == "1-2"
    assert record.label == "clean" and record.method == "background-snapshot"
    assert record.argv == list(PARENT.argv)
    assert record.disks == [RecordedDisk("vda", "/images/web.qcow2", "qcow2", 8 << 30)]
    taken = datetime.fromisoformat(record.taken_at)
    assert taken.tzinfo is not None and before <= taken <= before + timedelta(seconds=5)


def test_a_record_reads_back_from_its_json():
    record = record_of(point(), "1-2", Label.CRASH_CONSISTENT, "web")
    text = record.to_json()
    data = json.loads(text)
    assert data["label"] == "crash-consistent" and data["version"] == 1
    assert data["disks"][0] == {"device": "vda", "image": "/images/web.qcow2",
                                "format": "qcow2", "virtual_size": 8 << 30}
    again = VmRecord.from_json(text)
    assert again == record
    assert isinstance(again.disks[0], RecordedDisk)
    assert VmRecord.from_json(text.decode()) == record  # str or bytes
