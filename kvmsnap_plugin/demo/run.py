"""`kvmsnap demo`: the main job, on the bundled demo guest.

Boots the demo guest on fresh disks, lets its workload write, shows what a crash-consistent
copy of its disk looks like, then what an orderly shutdown leaves behind.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmsnap_plugin import host, verify
from kvmsnap_plugin.demo.builder import build_guest
from kvmsnap_plugin.demo.vm import DemoOptions, demo_vm

log = logging.getLogger("kvmsnap")


@dataclass(frozen=True)
class DiskView:
    """What one copy of the demo disk holds."""

    label: str
    state: str
    lines: int
    marker: bool

    @classmethod
    def of(cls, label: str, image: Path) -> DiskView:
        state, _ = verify.ext4_state(image)
        log_text = (verify.read_file(image, "/workload.log") or b"").decode()
        return cls(label, state.value, len(log_text.splitlines()),
                   verify.read_file(image, "/clean-shutdown") is not None)


@dataclass(frozen=True)
class DemoReport:
    accelerator: str
    boot_s: float
    counter_at_copy: int
    views: list[DiskView]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def render(self) -> str:
        rows = [f"accelerator: {self.accelerator}; guest ready in {self.boot_s:.1f} s",
                f"workload counter when the crash-consistent copy was taken: "
                f"{self.counter_at_copy}",
                f"{'copy':32} {'filesystem':16} {'lines':>6}  shutdown marker"]
        rows += [f"{v.label:32} {v.state:16} {v.lines:6}  {'yes' if v.marker else 'no'}"
                 for v in self.views]
        return "\n".join(rows)


def run_demo() -> DemoReport:
    log.info("building (or reusing) the demo guest")
    guest = build_guest()
    accel, why = host.choose_accelerator(guest.kernel, guest.initrd)
    log.info("accelerator: %s (%s)", accel, why)
    with tempfile.TemporaryDirectory(prefix="kvmsnap-demo-") as tmp:
        workdir = Path(tmp)
        with demo_vm(guest, accel, DemoOptions(), workdir=workdir) as vm:
            started = time.monotonic()
            vm.wait_ready()
            boot_s = time.monotonic() - started
            counter = vm.wait_counter(20)
            log.info("guest ready; workload at line %d; copying its disk as a crash would",
                     counter)
            crash = vm.crash_copy(0, workdir / "crash.raw")
            counter = max(counter, vm.counter())
            log.info("pressing the power button")
            vm.power_off_cleanly()
        clean = verify.raw_copy(vm.paths.disks[0], workdir / "clean.raw")
        views = [DiskView.of("crash-consistent copy (paused)", crash),
                 DiskView.of("after clean shutdown", clean)]
    return DemoReport(accel, boot_s, counter, views)
