"""The node_exporter textfile: what prometheus_client's own parser reads back from it."""

from __future__ import annotations

import stat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmsnap_plugin.model import (
    ArchiveResult,
    BackupReport,
    FsState,
    Label,
    Plan,
    RamMethod,
    RunSettings,
    ShutdownResult,
    Verdict,
    VmOutcome,
)
from kvmsnap_plugin.run.metrics import FAMILIES, write_metrics


def report(vm: str, pause_ms: float = 7.5, shutdown_s: float = 4.25) -> BackupReport:
    archives = [ArchiveResult("local-borg", "borg", "files", f"{vm}-files", "/mnt", 3000,
                              1000, 2.0),
                ArchiveResult("local-borg", "borg", "image", f"{vm}-image", "vda", 8000,
                              500, 3.0),
                ArchiveResult("offsite", "restic", "files", "abc123", "/mnt", 3000, None, 4.0)]
    verdicts = [Verdict("vda", "p1", "ext4", FsState.CLEAN, "clean"),
                Verdict("vda", "p2", "xfs", FsState.CLEAN, "clean"),
                Verdict("vdb", "", "ext4", FsState.NEEDS_RECOVERY, "journal")]
    return BackupReport(vm, Label.CLEAN, RamMethod.BACKGROUND, pause_ms, 1.0, 1 << 28, 3.0,
                        None, 1.5, ShutdownResult(True, "guest", shutdown_s, 1, "guest-shutdown"),
                        verdicts, archives, [], [], 20.0)


def ok(vm: str, at: float, **kwargs) -> VmOutcome:
    return VmOutcome(vm, 0, at - 30, at, report(vm, **kwargs))


def failed(vm: str, at: float) -> VmOutcome:
    return VmOutcome(vm, 2, at - 5, at, None, "the clone did not shut down", "raise the timeout")


def parsed(path) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value; also checks every family has HELP and TYPE."""
    text = path.read_text()
    for name in FAMILIES:
        assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text, name
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def settings(tmp_path) -> RunSettings:
    return RunSettings(metrics_file=tmp_path / "textfile" / "kvmsnap.prom")


def test_each_vm_gets_its_series_with_the_reports_values(settings):
    assert write_metrics(settings, [ok("web", 1000.0), failed("db", 1010.0)]) == \
        settings.metrics_file
    got = parsed(settings.metrics_file)
    web, db = (("vm", "web"),), (("vm", "db"),)
    assert got["kvmsnap_last_run_timestamp_seconds", web] == 1000.0
    assert got["kvmsnap_last_success_timestamp_seconds", web] == 1000.0
    assert got["kvmsnap_exit_status", web] == 0
    assert got["kvmsnap_pause_milliseconds", web] == 7.5
    assert got["kvmsnap_clone_shutdown_seconds", web] == 4.25
    assert got["kvmsnap_backup_duration_seconds", web] == 30.0
    archive = {(dict(k)["archive"], dict(k)["content"], dict(k)["kind"]): v
               for (name, k), v in got.items() if name == "kvmsnap_archive_bytes"}
    assert archive == {("local-borg", "files", "read"): 3000, ("local-borg", "files", "new"): 1000,
                       ("local-borg", "image", "read"): 8000, ("local-borg", "image", "new"): 500,
                       ("offsite", "files", "read"): 3000}  # restic: no "new" figure
    verdicts = {dict(k)["verdict"]: v for (name, k), v in got.items()
                if name == "kvmsnap_verdicts" and dict(k)["vm"] == "web"}
    assert verdicts == {"clean": 2, "needs-recovery": 1, "unknown": 0}
    # the failed VM: when it ran, how it ended; no success, no figures it never measured
    assert got["kvmsnap_exit_status", db] == 2
    assert got["kvmsnap_last_run_timestamp_seconds", db] == 1010.0
    assert ("kvmsnap_last_success_timestamp_seconds", db) not in got
    assert ("kvmsnap_pause_milliseconds", db) not in got


def test_the_last_success_survives_a_failed_run(settings):
    write_metrics(settings, [ok("web", 1000.0), ok("db", 1000.0)])
    write_metrics(settings, [failed("web", 2000.0), ok("db", 2000.0, pause_ms=9.0)])
    got = parsed(settings.metrics_file)
    assert got["kvmsnap_last_success_timestamp_seconds", (("vm", "web"),)] == 1000.0
    assert got["kvmsnap_last_run_timestamp_seconds", (("vm", "web"),)] == 2000.0
    assert got["kvmsnap_exit_status", (("vm", "web"),)] == 2
    assert ("kvmsnap_pause_milliseconds", (("vm", "web"),)) not in got  # not last run's
    assert got["kvmsnap_last_success_timestamp_seconds", (("vm", "db"),)] == 2000.0
    assert got["kvmsnap_pause_milliseconds", (("vm", "db"),)] == 9.0
    # a later success moves it on
    write_metrics(settings, [ok("web", 3000.0)])
    assert parsed(settings.metrics_file)[
        "kvmsnap_last_success_timestamp_seconds", (("vm", "web"),)] == 3000.0


def test_vms_a_run_left_out_keep_their_series(settings):
    write_metrics(settings, [ok("web", 1000.0), ok("db", 1000.0, pause_ms=3.0)])
    write_metrics(settings, [ok("web", 2000.0)])  # kvmsnap backup --config ... --vm web
    got = parsed(settings.metrics_file)
    assert got["kvmsnap_pause_milliseconds", (("vm", "db"),)] == 3.0
    assert got["kvmsnap_last_success_timestamp_seconds", (("vm", "db"),)] == 1000.0
    assert got["kvmsnap_last_run_timestamp_seconds", (("vm", "web"),)] == 2000.0
    names = [k for k in got if k[0] == "kvmsnap_exit_status"]
    assert len(names) == 2  # one series each, no duplicates


def test_a_dry_run_or_a_warning_is_judged_right(settings):
    plan = Plan("web", 1, [], [], [], "/mnt")
    warned = VmOutcome("db", 1, 10.0, 50.0, report("db"))
    write_metrics(settings, [VmOutcome("web", 0, 10.0, 20.0, plan), warned])
    got = parsed(settings.metrics_file)
    assert ("kvmsnap_last_success_timestamp_seconds", (("vm", "web"),)) not in got
    assert got["kvmsnap_last_success_timestamp_seconds", (("vm", "db"),)] == 50.0
    assert got["kvmsnap_exit_status", (("vm", "db"),)] == 1


def test_the_file_is_replaced_whole_and_readable_by_node_exporter(settings, tmp_path):
    settings.metrics_file.parent.mkdir()
    settings.metrics_file.write_text("# a corrupt earlier file {\n")
    old_inode = settings.metrics_file.stat().st_ino
    write_metrics(settings, [ok("web", 1000.0)])  # an unreadable file: started afresh
    st = settings.metrics_file.stat()
    assert st.st_ino != old_inode  # renamed into place, never rewritten in place
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert sorted(p.name for p in settings.metrics_file.parent.iterdir()) == ["kvmsnap.prom"]
    assert parsed(settings.metrics_file)["kvmsnap_exit_status", (("vm", "web"),)] == 0


def test_no_metrics_file_no_metrics(tmp_path):
    assert write_metrics(RunSettings(), [ok("web", 1000.0)]) is None


def test_a_verified_backup_has_its_verification_in_the_metrics(settings):
    from dataclasses import replace

    from kvmsnap_plugin.model import VerifyReport

    proven = VerifyReport("web", "repo::web-1", "image", booted=True, came_up=True,
                          shut_down_clean=True, came_up_s=12.5)
    verified = VmOutcome("web", 0, 970.0, 1000.0, replace(report("web"), verified=proven))
    write_metrics(settings, [verified, ok("db", 1000.0)])
    got = parsed(settings.metrics_file)
    assert got["kvmsnap_verify_status", (("vm", "web"),)] == proven.exit_code == 0
    assert got["kvmsnap_verify_came_up_seconds", (("vm", "web"),)] == 12.5
    assert got["kvmsnap_last_verify_timestamp_seconds", (("vm", "web"),)] == 1000.0
    assert got["kvmsnap_last_verify_success_timestamp_seconds", (("vm", "web"),)] == 1000.0
    assert ("kvmsnap_verify_status", (("vm", "db"),)) not in got  # not verified: no series


def test_a_standalone_verify_adds_its_vms_verification_and_keeps_every_backup_series(settings):
    from kvmsnap_plugin.model import VerifyReport
    from kvmsnap_plugin.run.metrics import write_verify_metrics

    write_metrics(settings, [ok("web", 1000.0), ok("db", 1000.0, pause_ms=3.0)])
    before = parsed(settings.metrics_file)
    proven = VerifyReport("web", "repo::web-1", "image", booted=True, came_up=True,
                          shut_down_clean=True, came_up_s=42.5)
    assert write_verify_metrics(settings.metrics_file, proven, 1500.0) == settings.metrics_file
    got = parsed(settings.metrics_file)
    web = (("vm", "web"),)
    assert {k: v for k, v in got.items() if "verify" not in k[0]} == before  # untouched
    assert got["kvmsnap_verify_status", web] == 0
    assert got["kvmsnap_verify_came_up_seconds", web] == 42.5
    assert got["kvmsnap_last_verify_timestamp_seconds", web] == 1500.0
    assert got["kvmsnap_last_verify_success_timestamp_seconds", web] == 1500.0
    assert not [k for k in got if "verify" in k[0] and k[1] == (("vm", "db"),)]

    # the next verification did not come up: status 1, its time, the last success kept
    write_verify_metrics(settings.metrics_file, VerifyReport(
        "web", "repo::web-2", "image", booted=True, failed=True), 2500.0)
    got = parsed(settings.metrics_file)
    assert got["kvmsnap_verify_status", web] == 1
    assert got["kvmsnap_last_verify_timestamp_seconds", web] == 2500.0
    assert got["kvmsnap_last_verify_success_timestamp_seconds", web] == 1500.0
    assert ("kvmsnap_verify_came_up_seconds", web) not in got  # not the old run's figure
    # a nightly backup without verify = true leaves the verification alone
    write_metrics(settings, [ok("web", 3000.0), ok("db", 3000.0)])
    got = parsed(settings.metrics_file)
    assert got["kvmsnap_last_run_timestamp_seconds", web] == 3000.0
    assert got["kvmsnap_verify_status", web] == 1
    assert got["kvmsnap_last_verify_success_timestamp_seconds", web] == 1500.0
    assert write_verify_metrics(None, proven, 4000.0) is None  # no file configured
