"""Which VMs a run backs up: --all, --exclude, [[vm]] domain globs (run/discover.py), and
what the command prints for them."""

from __future__ import annotations

import json
from pathlib import Path

from kvmsnap_plugin import cli
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, ForkOptions, Plan, ShutdownPolicy
from kvmsnap_plugin.run import discover, pipeline
from kvmsnap_plugin.run.discover import domain_jobs

RUNNING = ["db-1", "db-2", "mail", "test-web", "web"]
BORG = (ArchiveTarget("borg", "borg", "files"),)
SLOW = ForkOptions(shutdown=ShutdownPolicy(timeout=900.0))


def test_all_makes_a_job_per_running_domain_less_the_excluded():
    template = BackupJob("*", None, targets=BORG, domain="*")
    jobs = domain_jobs([template], "qemu:///system", ("test-*", "mail"), running=RUNNING)
    assert [(j.name, j.domain, j.targets) for j in jobs] == [
        ("db-1", "db-1", BORG), ("db-2", "db-2", BORG), ("web", "web", BORG)]


def test_explicit_tables_win_over_globs_and_globs_give_their_settings():
    web = BackupJob("web", None, targets=(ArchiveTarget("r", "restic", "image"),),
                    domain="web")
    dbs = BackupJob("db-*", None, SLOW, targets=BORG, domain="db-*")
    rest = BackupJob("*", None, targets=BORG, domain="*")
    jobs = domain_jobs([web, dbs, rest], "qemu:///system", (), all_domains=False,
                       running=RUNNING)
    by_name = {j.name: j for j in jobs}
    assert sorted(by_name) == sorted(RUNNING)
    assert by_name["web"] is web  # named exactly: its own table
    assert by_name["db-2"].fork.shutdown.timeout == 900.0  # the first glob that matches
    assert by_name["mail"].fork.shutdown.timeout != 900.0


def test_a_glob_without_all_takes_only_what_it_matches(caplog):
    dbs = BackupJob("db-*", None, targets=BORG, domain="db-*")
    bare = BackupJob("bare", Path("/run/bare.qmp"), targets=BORG)
    jobs = domain_jobs([bare, dbs], "qemu:///system", (), all_domains=False,
                       running=RUNNING)
    assert [j.name for j in jobs] == ["bare", "db-1", "db-2"]
    # with all_domains, the domains no table matches are named in a warning, not dropped
    # silently
    domain_jobs([dbs], "qemu:///system", ("test-*",), all_domains=True, running=RUNNING)
    assert "mail: not backed up" in caplog.text and "test-web" not in caplog.text


def test_backup_all_from_the_command_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(discover, "running_domains", lambda uri: ["a", "b", "skip-me"])

    def fake_plan(job: BackupJob) -> Plan:
        if job.name == "b":
            raise VMError("b has a vhost-user disk", "back it up offline")
        return Plan(job.name, 1, [], [], [], "/mnt")

    monkeypatch.setattr(pipeline, "plan", fake_plan)
    code = cli.main(["backup", "--all", "--exclude", "skip-*", "--borg", str(tmp_path),
                     "--dry-run", "--json", "--max-clones", "2"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_ERROR  # the worst of the VMs'
    shown = json.loads(captured.out)
    assert [(o["vm"], o["status"], o["exit_code"]) for o in shown] == [
        ("a", "ok", 0), ("b", "error", 2)]
    assert shown[1]["error"] == "b has a vhost-user disk"
    assert [line for line in captured.err.splitlines() if "error:" in line] == [
        "kvmsnap: error: b: b has a vhost-user disk (fix: back it up offline)"]


def test_one_failing_vm_still_prints_its_json_result(monkeypatch, capsys):
    def fake_plan(job: BackupJob) -> Plan:
        raise VMError("web is not running", "start it")

    monkeypatch.setattr(pipeline, "plan", fake_plan)
    code = cli.main(["backup", "--domain", "web", "--borg", "/r", "--dry-run", "--json"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_ERROR
    shown = json.loads(captured.out)  # one VM: its object, as a single backup always was
    assert (shown["vm"], shown["status"], shown["error"], shown["fix"]) == (
        "web", "error", "web is not running", "start it")
    assert captured.err.splitlines()[-1] == \
        "kvmsnap: error: web is not running (fix: start it)"


def test_max_clones_must_be_at_least_one(capsys):
    assert cli.main(["backup", "--domain", "web", "--borg", "/r", "--max-clones", "0"]) == 2
    assert "max_clones must be a whole number, at least 1, not 0" in capsys.readouterr().err
