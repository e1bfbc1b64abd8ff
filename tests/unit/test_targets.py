"""Archive targets are independent (run/targets.py): every one is attempted, each reported."""

from __future__ import annotations

import pytest

from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.model import ArchiveResult, ArchiveTarget, BackupJob, Label, TargetFailure
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run import targets
from kvmsnap_plugin.run.targets import archive_each, checked_targets

TARGETS = tuple(ArchiveTarget(name, "borg", "files") for name in ("local", "offsite", "usb"))
JOB = BackupJob("web", None, targets=TARGETS, domain="web")


def result(target: str) -> ArchiveResult:
    return ArchiveResult(target, "borg", "files", f"web-{target}", "/mnt", 1, 1, 1.0)


class FailingHooks:
    """Archives into every target but the ones named in ``broken``."""

    def __init__(self, *broken: str) -> None:
        self.broken, self.tried = broken, []

    def archive(self, job, target, exposure, label):
        self.tried.append(target.name)
        if target.name in self.broken:
            raise ArchiveError(f"{target.name}: repository at sftp://u:pw@h/r is full",
                               "free space there")
        return [result(target.name)]


def test_a_failed_target_does_not_stop_the_next():
    hooks = FailingHooks("local")
    archives, failures = archive_each(JOB, hooks, None, Label.CLEAN)
    assert hooks.tried == ["local", "offsite", "usb"]
    assert archives == [result("offsite"), result("usb")]
    assert failures == [TargetFailure("local", "borg",
                                      "local: repository at sftp://u:***@h/r is full",
                                      "free space there")]


def test_when_every_target_fails_the_first_error_is_raised():
    hooks = FailingHooks("local", "offsite", "usb")
    with pytest.raises(ArchiveError, match=r"^local: "):
        archive_each(JOB, hooks, None, Label.CLEAN)
    assert hooks.tried == ["local", "offsite", "usb"]


class Checker:
    """An archiver whose repository check refuses the targets named in ``broken``."""

    def __init__(self, *broken: str) -> None:
        self.broken, self.checked = broken, []

    @hookimpl
    def kvmsnap_pre_backup(self, job, parent):
        for target in job.targets:
            self.checked.append(target.name)
            if target.name in self.broken:
                raise ArchiveError(f"cannot open {target.name}", "check it")


class Freezer:
    """A plugin that quiesces the guest in pre_backup: it must run once, not per target."""

    calls = 0

    @hookimpl
    def kvmsnap_pre_backup(self, job, parent):
        Freezer.calls += 1


def test_a_target_whose_repository_does_not_open_is_left_out_and_reported(monkeypatch):
    checker = Checker("local")
    monkeypatch.setattr(targets, "builtin_plugins", lambda: [checker])
    hooks = Hooks(plugin_manager([checker, Freezer()], entry_points=False))
    job, failures = checked_targets(JOB, hooks, None)
    assert [t.name for t in job.targets] == ["offsite", "usb"]
    assert failures == [TargetFailure("local", "borg", "cannot open local", "check it")]
    assert checker.checked == ["local", "offsite", "usb"] and Freezer.calls == 0
    none_open = Checker("local", "offsite", "usb")
    monkeypatch.setattr(targets, "builtin_plugins", lambda: [none_open])
    with pytest.raises(ArchiveError, match="cannot open local"):
        checked_targets(JOB, Hooks(plugin_manager([none_open], entry_points=False)), None)


def test_one_target_is_checked_by_the_hook_as_always():
    hooks = Hooks(plugin_manager([Checker("local")], entry_points=False))
    one = BackupJob("web", None, targets=TARGETS[:1], domain="web")
    assert checked_targets(one, hooks, None) == (one, [])


def test_the_report_and_json_say_each_targets_result():
    from kvmsnap_plugin.model import BackupReport, RamMethod, ShutdownResult
    from kvmsnap_plugin.run.report import render_report

    report = BackupReport("web", Label.CLEAN, RamMethod.BACKGROUND, 1.0, 1.0, 1, 1.0, 1, 1.0,
                          ShutdownResult(True, "guest", 1.0, 1, "guest-shutdown"), [],
                          [result("offsite")], [], [], 2.0,
                          failed_targets=[TargetFailure("local", "borg", "disk full", "free")])
    assert report.as_dict()["targets"] == [
        {"target": "offsite", "status": "ok"},
        {"target": "local", "status": "error", "error": "disk full", "fix": "free"}]
    assert "  FAILED   local              borg   disk full (fix: free)" in \
        render_report(report).splitlines()
