"""``python -m kvmsnap_demo demo`` (``make demo``): the main job, on the bundled demo guest.

Boots the demo guest (its workload keeps writing lines that stay in the page cache), backs
it up while it runs into a borg and a restic repository, and shows the difference that is
the point of kvmsnap: the crash-consistent image of the fork instant (what a plain
snapshot gives) next to the cleanly shut-down clone that was archived. Finally the parent
is shut down and its disk checked: it never noticed, and lost nothing. Last, the backup is
verified: its image archive boots in a sandbox (``kvmsnap verify``) and shuts down clean.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmsnap_demo.builder import build_guest
from kvmsnap_demo.disk import DiskContents, read_disk
from kvmsnap_demo.vm import DemoOptions, demo_vm
from kvmsnap_plugin.host import probes, process
from kvmsnap_plugin.model import (
    ArchiveTarget,
    BackupJob,
    BackupReport,
    ForkOptions,
    VerifyReport,
    VerifySettings,
)
from kvmsnap_plugin.plugin.hookspecs import hookimpl
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup
from kvmsnap_plugin.run.report import render_report
from kvmsnap_plugin.run.verify import render as render_verify
from kvmsnap_plugin.run.verify import verify_borg

log = logging.getLogger("kvmsnap")

DEMO_PASSPHRASE = "kvmsnap demo passphrase"


@dataclass(frozen=True)
class View:
    label: str
    state: str
    lines: int
    marker: bool

    @classmethod
    def of(cls, label: str, disk: DiskContents) -> View:
        return cls(label, disk.state.value, len(disk.lines), disk.marker is not None)


@dataclass(frozen=True)
class DemoReport:
    accelerator: str
    counter_before: int
    backup: BackupReport
    views: list[View]
    repositories: dict[str, str]
    verified: VerifyReport  # the image archive booted again: `kvmsnap verify`

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backup"] = self.backup.as_dict()
        data["verified"] = self.verified.as_dict()
        return data

    def render(self) -> str:
        rows = [render_report(self.backup), "",
                f"accelerator: {self.accelerator}; the guest's workload was at line "
                f"{self.counter_before} when the backup started", "",
                f"{'the demo disk, seen as':46} {'filesystem':15} {'lines':>6}  marker"]
        rows += [f"{v.label:46} {v.state:15} {v.lines:6}  {'yes' if v.marker else 'no'}"
                 for v in self.views]
        rows += ["", *(f"{kind} repository: {path}" for kind, path in
                       self.repositories.items())]
        rows += ["", render_verify(self.verified)]
        return "\n".join(rows)


class CrashView:
    """Reads the frozen images at the fork instant: what a plain snapshot would archive."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.disk: DiskContents | None = None

    @hookimpl
    def kvmsnap_post_shutdown(self, fork) -> None:
        self.disk = read_disk(fork.disks[0].frozen, self.scratch / "frozen.raw")


def run_demo(out: Path) -> DemoReport:
    log.info("building (or reusing) the demo guest")
    guest = build_guest()
    accel, why = probes.choose_accelerator(guest.kernel, guest.initrd)
    log.info("accelerator: %s (%s)", accel, why)
    repositories = _fresh_repositories(out)
    with tempfile.TemporaryDirectory(prefix="kvmsnap-demo-") as tmp, \
            _demo_secrets(out), demo_vm(guest, accel, DemoOptions()) as vm:
        scratch = Path(tmp)
        vm.wait_ready()
        counter = vm.wait_counter(20)
        log.info("demo guest running; its workload is at line %d: backing it up", counter)
        crash = CrashView(scratch)
        targets = tuple(ArchiveTarget(kind, kind, "both", {"repository": str(path)})
                        for kind, path in repositories.items())
        job = BackupJob("demo", vm.paths.backup_qmp,
                        ForkOptions(workdir=scratch / "work"),
                        targets)
        report = backup(job, Hooks(plugin_manager([crash])))
        archived = _archived_files(repositories["borg"], report, scratch)
        log.info("the backup is done; the parent ran on: shutting it down to check it")
        vm.power_off_cleanly()
        parent = read_disk(vm.paths.disks[0], scratch / "parent.raw")
        verified = _verify(repositories["borg"], report, scratch)
    assert crash.disk is not None
    views = [View.of("crash-consistent snapshot of the fork instant", crash.disk),
             View.of("kvmsnap's clean clone, as borg archived it", archived),
             View.of("the parent, shut down after the backup", parent)]
    return DemoReport(accel, counter, report, views, {k: str(v) for k, v in
                                                      repositories.items()}, verified)


def _verify(borg_repo: Path, report: BackupReport, scratch: Path) -> VerifyReport:
    """`kvmsnap verify` of the image archive just made: it boots, on its own, to the
    workload's ready line, and shuts down clean (seconds for the demo guest)."""
    image = next(a for a in report.archives if a.type == "borg" and a.kind == "image")
    log.info("verifying the backup: booting %s in a sandbox", image.name)
    return verify_borg(f"{borg_repo}::{image.name}", VerifySettings(console=r"KVMSNAP-READY",
                                                                    timeout=120),
                       scratch / "verify-work")


def _fresh_repositories(out: Path) -> dict[str, Path]:
    """Empty borg and restic repositories under ``out`` (replacing a previous demo's)."""
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    repos = {"borg": out / "borg", "restic": out / "restic"}
    with _demo_secrets(out):
        process.run([process.find_program("borg", "borgbackup"), "init",
                     "--encryption=repokey", repos["borg"]], timeout=120)
        process.run(["restic", "init", "-r", repos["restic"]], timeout=120)
    return repos


def _demo_secrets(out: Path):
    """The demo repositories' secrets, in the environment only (as kvmsnap wants them)."""
    return process.environment({"BORG_PASSPHRASE": DEMO_PASSPHRASE,
                                "RESTIC_PASSWORD": DEMO_PASSPHRASE,
                                "BORG_BASE_DIR": str(out / ".borg"),
                                "RESTIC_CACHE_DIR": str(out / ".cache")})


def _archived_files(borg_repo: Path, report: BackupReport, scratch: Path) -> DiskContents:
    """The image archive, extracted back from borg: proof of what the repository holds."""
    image = next(a for a in report.archives if a.type == "borg" and a.kind == "image")
    target = scratch / "extract"
    target.mkdir()
    process.run([process.find_program("borg", "borgbackup"), "extract", "--sparse",
                 f"{borg_repo}::{image.name}"], timeout=600, cwd=target)
    raw = next(target.glob("*.raw"))
    return read_disk(raw, raw)
