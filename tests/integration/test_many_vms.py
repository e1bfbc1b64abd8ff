"""Many VMs in one run (run/fleet.py), on real guests: two at a time, each VM's result its
own, archive targets independent, --json listing every VM even when some fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import kvmsnap
from prometheus_client.parser import text_string_to_metric_families

from kvmsnap_plugin.host import process

pytestmark = pytest.mark.qemu
pytest_plugins = ["libvirt_fixtures"]  # the libvirtd and start_domain fixtures


def borg_archives(repo: Path) -> list[str]:
    return process.run([process.find_program("borg", "borgbackup"), "list", "--short", repo],
                       timeout=300).stdout.split()


def write_config(tmp_path: Path, body: str) -> Path:
    """A config with a work directory of the test's own (and a small margin) + ``body``."""
    config = tmp_path / "kvmsnap.toml"
    config.write_text(f'[defaults]\nworkdir = "{tmp_path / "work"}"\nmin_free = "64M"\n'
                      f"{body}")
    return config


def good_borg(repo: Path) -> str:
    return f'\n[archiver.good]\ntype = "borg"\nrepository = "{repo}"\n'


def overlapped(one: dict, other: dict) -> bool:
    return one["started_at"] < other["finished_at"] and other["started_at"] < one["finished_at"]


def test_four_vms_two_at_a_time_one_failing_one_with_a_failed_target(start_demo, start_domain,
                                                                       borg_repo, tmp_path):
    vms = {name: start_demo() for name in ("a", "b", "c")}  # bare QEMU
    domain = start_domain()  # and a libvirt domain, in one config
    other_repo = tmp_path / "borg-other"
    process.run([process.find_program("borg", "borgbackup"), "init", "--encryption=repokey",
                 other_repo], timeout=120)
    metrics, notified = tmp_path / "kvmsnap.prom", tmp_path / "notified"
    notify = f"""["sh", "-c", 'echo "$KVMSNAP_VM $KVMSNAP_STATUS" >> {notified}']"""
    config = write_config(tmp_path, f"""on_failure = {notify}

[run]
metrics_file = "{metrics}"

[[vm]]
name = "a"
qmp = "{vms['a'].paths.backup_qmp}"
archivers = ["broken", "good"]     # the first target fails, the second is still made

[[vm]]
name = "b"
qmp = "{vms['b'].paths.backup_qmp}"
archivers = ["good"]               # into the same repository as a, at the same time

[[vm]]
name = "c"
qmp = "{vms['c'].paths.backup_qmp}"
archivers = ["missing"]            # its only repository does not exist: c fails alone

[[vm]]
name = "d"
domain = "{domain.name}"
libvirt_uri = "{domain.uri}"
archivers = ["good"]

{good_borg(borg_repo)}
[archiver.broken]
type = "borg"
repository = "{other_repo}"
extra_args = ["--no-such-option"]  # the repository opens; borg create fails

[archiver.missing]
type = "borg"
repository = "{tmp_path / 'no-repo'}"
""")
    done = kvmsnap("backup", "--config", str(config), "--max-clones", "2", "--json",
                   timeout=1800)
    assert done.returncode == 2, done.stderr[-3000:]  # the worst of the VMs'
    outcomes = json.loads(done.stdout)
    by_vm = {o["vm"]: o for o in outcomes}
    assert [o["vm"] for o in outcomes] == ["a", "b", "c", "d"]

    # b and the libvirt domain d: archived, clean
    for vm in "bd":
        assert (by_vm[vm]["status"], by_vm[vm]["exit_code"]) == ("ok", 0), by_vm[vm]
    assert by_vm["b"]["targets"] == [{"target": "good", "status": "ok"}]
    # a: its first target failed, its second got the archive; exit code 2 for a
    assert by_vm["a"]["exit_code"] == 2 and by_vm["a"]["status"] == "error"
    targets = {t["target"]: t for t in by_vm["a"]["targets"]}
    assert targets["good"]["status"] == "ok"
    assert targets["broken"]["status"] == "error" and targets["broken"]["fix"]
    assert [a["target"] for a in by_vm["a"]["archives"]] == ["good"]
    # c: failed before its fork, with the reason; no report
    assert by_vm["c"]["exit_code"] == 2 and "archives" not in by_vm["c"]
    assert "no-repo" in by_vm["c"]["error"] and by_vm["c"]["fix"]

    names = borg_archives(borg_repo)
    assert all(any(n.startswith(f"{vm}-") for n in names) for vm in "abd"), names
    assert borg_archives(other_repo) == []
    assert overlapped(by_vm["a"], by_vm["b"])  # two at once: a and b ran side by side
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvmsnap: error:")]
    assert len(errors) == 2 and errors[0].startswith("kvmsnap: error: a: ") \
        and errors[1].startswith("kvmsnap: error: c: "), done.stderr
    assert "[3/4] c: started" in done.stderr  # progress, a line per start and end
    # monitoring: the textfile collector's file holds every VM's result, and the failure
    # command ran once per failed VM, with its name and status
    samples = {(sample.name, sample.labels.get("vm")): sample.value
               for family in text_string_to_metric_families(metrics.read_text())
               for sample in family.samples}
    assert {vm: samples["kvmsnap_exit_status", vm] for vm in "abcd"} == {
        "a": 2, "b": 0, "c": 2, "d": 0}
    assert samples["kvmsnap_pause_milliseconds", "b"] > 0
    assert ("kvmsnap_last_success_timestamp_seconds", "b") in samples
    assert ("kvmsnap_last_success_timestamp_seconds", "c") not in samples
    assert sorted(notified.read_text().splitlines()) == ["a error", "c error"]
    for vm in vms.values():  # every parent runs on, on its own chain
        assert not list(vm.paths.disks[0].parent.glob("*.kvmsnap-*"))
        vm.wait_counter(vm.counter() + 1)
    assert domain.state() == "running" and domain.blklist() == [("vda", str(domain.disks[0]))]


def test_all_domains_and_a_glob_table_with_one_excluded(start_domain, borg_repo, tmp_path):
    kept, left = start_domain(), start_domain()
    # --all: every running domain, less the excluded (a dry run: on a shared libvirt, other
    # domains are only looked at)
    done = kvmsnap("backup", "--all", "--exclude", left.name, "--libvirt-uri", kept.uri,
                   "--borg", str(borg_repo), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout)
    names = [o["vm"] for o in (shown if isinstance(shown, list) else [shown])]
    assert kept.name in names and left.name not in names
    # a [[vm]] whose domain is a glob gives its settings to the domains it matches
    config = write_config(tmp_path, f"""
[[vm]]
domain = "kvmsnap-test-{os.getpid()}-*"
libvirt_uri = "{kept.uri}"
archivers = ["good"]

{good_borg(borg_repo)}""")
    done = kvmsnap("backup", "--config", str(config), "--exclude", left.name, "--json",
                   timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)  # one VM left: its object
    assert (outcome["vm"], outcome["status"]) == (kept.name, "ok")
    archives = borg_archives(borg_repo)
    assert len(archives) == 1 and archives[0].startswith(f"{kept.name}-2"), archives
    assert kept.state() == "running" and left.state() == "running"
    assert kept.blklist() == [("vda", str(kept.disks[0]))]
