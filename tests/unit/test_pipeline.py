"""The pipeline's decisions that need no VM: the label, which images, the warnings, the text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import (
    ArchiveResult,
    ArchiveTarget,
    BackupJob,
    BackupReport,
    CloneDisk,
    ClonePlan,
    Collapse,
    ForkOptions,
    FsState,
    Label,
    OnUnclean,
    RamMethod,
    ShutdownResult,
    Verdict,
)
from kvmsnap_plugin.run import pipeline
from kvmsnap_plugin.run.report import render_report, warnings_of
from kvmsnap_plugin.run.targets import archive_each
from kvmsnap_plugin.vm.clone import images_to_archive, label_of

CLEAN_STOP = ShutdownResult(True, "guest", 4.2, 1, "guest-shutdown")
HUNG = ShutdownResult(False, "kill", 300.0, 2, "no SHUTDOWN event within 300 s")
PLAN = ClonePlan(("qemu",), (CloneDisk("vda", Path("/w/vda.qcow2"), Path("/i/web.qcow2"),
                                       "qcow2"),), Path("/w"), Path("/w/qmp"), None)
CLEAN_FS = Verdict("vda", "p1", "ext4", FsState.CLEAN, "clean")
DIRTY_FS = Verdict("vda", "p2", "xfs", FsState.NEEDS_RECOVERY, "log needs replay")
ARCHIVE = ArchiveResult("borg", "borg", "files", "web-files", "/mnt", 3 << 20, 1 << 20, 2.0,
                        ("file changed while we backed it up",))


def test_a_clean_shutdown_archives_the_clones_disks():
    label = label_of(CLEAN_STOP, OnUnclean.FAIL)
    assert label is Label.CLEAN
    assert images_to_archive(PLAN, label) == [("vda", Path("/w/vda.qcow2"), "qcow2")]


def test_an_unclean_shutdown_falls_back_to_the_frozen_images_only_if_allowed():
    label = label_of(HUNG, OnUnclean.CRASH_CONSISTENT)
    assert label is Label.CRASH_CONSISTENT
    assert images_to_archive(PLAN, label) == [("vda", Path("/i/web.qcow2"), "qcow2")]
    raw = dataclasses.replace(PLAN, disks=(CloneDisk("vda", Path("/w/vda.qcow2"),
                                                     Path("/i/web.img"), "raw"),))
    # the frozen image is read as what QEMU opened it as, whatever its bytes look like
    assert images_to_archive(raw, label) == [("vda", Path("/i/web.img"), "raw")]
    with pytest.raises(VMError, match="did not shut down cleanly") as info:
        label_of(HUNG, OnUnclean.FAIL)
    assert "--on-unclean crash-consistent" in info.value.hint


def test_warnings_name_the_fallback_the_dirty_filesystems_and_the_archivers():
    assert warnings_of(Label.CRASH_CONSISTENT, [CLEAN_FS, DIRTY_FS], [ARCHIVE], []) == [
        "archived the crash-consistent images: the clone did not shut down cleanly",
        "vda/p2: log needs replay",
        "borg: file changed while we backed it up"]
    assert warnings_of(Label.CLEAN, [CLEAN_FS], [], []) == []


def test_the_mount_root_is_stable_per_vm(tmp_path):
    job = BackupJob("web/01", None, ForkOptions(workdir=tmp_path), domain="web/01")
    assert pipeline.mount_root(job) == tmp_path / "mnt" / "web_01"
    chosen = BackupJob("web", None, ForkOptions(mount_root=tmp_path / "here"), domain="web")
    assert pipeline.mount_root(chosen) == tmp_path / "here"


def test_the_archive_step_runs_every_target_in_order(tmp_path):
    class FakeHooks:
        def __init__(self) -> None:
            self.targets: list[str] = []

        def archive(self, job, target, exposure, label):
            self.targets.append(target.name)
            return [ARCHIVE]

    targets = tuple(ArchiveTarget(name, "borg", "files") for name in ("a", "b"))
    hooks = FakeHooks()
    job = BackupJob("web", None, targets=targets, domain="web")
    assert archive_each(job, hooks, None, Label.CLEAN) == ([ARCHIVE, ARCHIVE], [])
    assert hooks.targets == ["a", "b"]


def test_the_report_reads_as_one_summary_and_a_line_per_item():
    report = BackupReport("web", Label.CLEAN, RamMethod.BACKGROUND, 12.34, 1.0, 1 << 30, 3.0,
                          9, 1.5, CLEAN_STOP, [CLEAN_FS], [ARCHIVE], ["/keep/vda.qcow2"], [],
                          20.0, ["borg: a warning"],
                          Collapse(0.5, 0.25, 0.75, collapsed_mib=300, unfinished_mib=200,
                                   rss_growth_kib=2048),
                          huge_pages_after=Collapse(0.3, 0.01, 1.0, collapsed_mib=512))
    assert render_report(report).splitlines() == [
        "web: clean (background-snapshot); parent paused 12.3 ms; clone restored in 1.5 s, "
        "shut down in 4.2 s (guest-shutdown); 20.0 s in all",
        "  huge pages 25% -> 75% of guest RAM before the pause (300 MiB re-collapsed "
        "in 0.50 s, RSS +2 MiB, 200 MiB left: time budget)",
        "  huge pages 1% -> 100% of guest RAM after the RAM snapshot (512 MiB re-collapsed "
        "in 0.30 s, RSS +0 MiB)",
        "  verdict  vda/p1             ext4   clean           clean",
        "  archive  borg               files  web-files  (3.0 MiB read, 1.0 MiB new, 2.0 s)",
        "  kept     /keep/vda.qcow2",
        "  warning  borg: a warning"]
