"""What a demo guest's data disk holds, read without mounting it (debugfs, dumpe2fs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.host import images
from kvmsnap_plugin.model import FsState


class WorkloadLines:
    """The demo workloads' numbered lines: "line 1", "line 2", ..."""

    lines: list[str] | tuple[str, ...]

    @property
    def numbers(self) -> list[int]:
        return [int(line.split()[1]) for line in self.lines]

    @property
    def continuous(self) -> bool:
        """Every line from 1 on, none missing, none repeated."""
        return self.numbers == list(range(1, len(self.numbers) + 1))


@dataclass(frozen=True)
class DiskContents(WorkloadLines):
    """What an ext4 data disk of the demo guest holds, read without mounting it."""

    state: FsState
    lines: list[str]
    marker: str | None


def read_disk(image: Path, scratch: Path) -> DiskContents:
    """Contents of a demo data disk (qcow2 or raw); ``scratch`` is a free file path."""
    raw = image if image.suffix == ".raw" else images.raw_copy(image, scratch, "qcow2")
    try:
        state, _ = verify.ext4_state(raw)
        log_text = (verify.read_file(raw, "/workload.log") or b"").decode()
        marker = verify.read_file(raw, "/clean-shutdown")
        return DiskContents(state, log_text.splitlines(),
                            marker.decode().strip() if marker is not None else None)
    finally:
        if raw != image:
            raw.unlink(missing_ok=True)
