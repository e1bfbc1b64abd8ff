"""What an archive says about the VM it came from: ``kvmsnap-vm.json``.

Written next to the clone's disks (in the mounted tree and beside the raw images) so every
archive carries it: the VM's name, its QEMU command line at backup time, its disks and the
fork's verdict. ``kvmsnap restore`` reads it back to say how to boot the restored images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from kvmsnap_plugin.fork import ForkPoint

FILENAME = "kvmsnap-vm.json"
VERSION = 1


@dataclass(frozen=True)
class RecordedDisk:
    device: str
    image: str  # the parent's image file at backup time
    format: str
    virtual_size: int


@dataclass(frozen=True)
class VmRecord:
    vm: str
    run: str  # ties together the archives and snapshots of one backup
    taken_at: str  # when this record was written, seconds after the fork; ISO 8601 UTC
    label: str  # "clean" or "crash-consistent"
    method: str
    argv: list[str]
    disks: list[RecordedDisk]
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> VmRecord:
        data: dict[str, Any] = json.loads(text)
        data["disks"] = [RecordedDisk(**d) for d in data.get("disks", [])]
        return cls(**data)


def record_of(point: ForkPoint, run: str, label: str, vm: str) -> VmRecord:
    disks = [RecordedDisk(d.device, d.filename, d.format, d.virtual_size)
             for d in point.parent.writable_disks]
    return VmRecord(vm, run, datetime.now(UTC).isoformat(timespec="seconds"), label,
                    point.method, list(point.parent.argv), disks)
