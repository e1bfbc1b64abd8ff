from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kvmsnap_plugin import cli
from kvmsnap_plugin.errors import HostError, UsageError, VMError
from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    BackupJob,
    ForkOptions,
    Mode,
    Plan,
    RamMethod,
    Recovery,
)
from kvmsnap_plugin.paths import DEFAULT_CONFIG
from kvmsnap_plugin.run import pipeline, recovery
from kvmsnap_plugin.vm.parent import vm_name


def test_errors_print_one_line_with_the_fix(monkeypatch, capsys):
    def broken(args):
        raise HostError("qemu-img not found", "apt-get install qemu-utils")

    monkeypatch.setattr(cli, "cmd_doctor", broken)
    code = cli.main(["doctor"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_ERROR
    assert err == ["kvmsnap: error: qemu-img not found (fix: apt-get install qemu-utils)"]


def test_unexpected_errors_hide_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_doctor", broken)
    assert cli.main(["doctor"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "boom" in err and "--debug" in err


@pytest.mark.parametrize("command", ["fork", "mount", "backup"])
def test_options_not_given_take_the_model_defaults(command):
    args = cli.build_parser().parse_args([command, "--domain", "web"])
    # None: not given, so that a config file's value is not overridden by a default
    assert args.shutdown_timeout is args.method is args.collapse_huge_pages is None
    job = cli._job_from_args(args)
    assert job.fork == ForkOptions() and job.libvirt_uri == DEFAULT_LIBVIRT_URI
    assert job.fork.shutdown.timeout == SHUTDOWN_TIMEOUT
    assert job.fork.shutdown.repress_after == REPRESS_AFTER


def test_the_offline_method_is_not_offered():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fork", "--qmp", "/a", "--method", "offline"])


def test_a_dry_run_prints_the_plan(monkeypatch, capsys, tmp_path):
    def fake_plan(job: BackupJob) -> Plan:
        return Plan(job.name, 4242, [{"device": "vda", "image": "/i/web.qcow2",
                                      "overlay": "/i/web.qcow2.kvmsnap-RUN.qcow2"}],
                    ["qemu-system-x86_64", "-incoming", "defer"], ["borg (borg, files)"],
                    str(tmp_path / "mnt"))

    monkeypatch.setattr(pipeline, "plan", fake_plan)
    code = cli.main(["backup", "--domain", "web", "--borg", str(tmp_path / "repo"),
                     "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert code == cli.EXIT_OK
    assert out == ["web (QEMU pid 4242) would be forked:",
                   "  disk vda: /i/web.qcow2 frozen; parent writes to "
                   "/i/web.qcow2.kvmsnap-RUN.qcow2",
                   "  clone: qemu-system-x86_64 -incoming defer",
                   f"  filesystems mounted under {tmp_path / 'mnt'}",
                   "  archive into borg (borg, files)"]


def test_one_failed_vm_of_many_prints_one_line_and_the_others_run(monkeypatch, capsys,
                                                                  tmp_path):
    def fake_plan(job: BackupJob) -> Plan:
        if job.name == "bad":
            raise VMError("bad is not running", "start it")
        return Plan(job.name, 1, [], [], [], "/mnt")

    monkeypatch.setattr(pipeline, "plan", fake_plan)
    config = tmp_path / "kvmsnap.toml"
    config.write_text('[[vm]]\ndomain = "bad"\narchivers = ["b"]\n[[vm]]\ndomain = "good"\n'
                      'archivers = ["b"]\n[archiver.b]\ntype = "borg"\nrepository = "/b"\n')
    code = cli.main(["backup", "--config", str(config), "--dry-run"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_ERROR
    assert [line for line in captured.err.splitlines() if line.startswith("kvmsnap: error")] == [
        "kvmsnap: error: bad: bad is not running (fix: start it)"]
    # progress: a line as each VM starts and as it ends
    assert any(line.endswith("[2/2] good: started (1 running)")
               for line in captured.err.splitlines())
    assert "bad: FAILED" in captured.out and "good (QEMU pid 1) would be forked:" in captured.out


def test_the_margin_and_the_pause_cap_reach_the_job():
    args = cli.build_parser().parse_args(["fork", "--domain", "web", "--min-free", "512M",
                                          "--max-pause", "2.5"])
    job = cli._job_from_args(args)
    assert job.fork.min_free == 512 << 20 and job.fork.max_pause == 2.5
    default = cli._job_from_args(cli.build_parser().parse_args(["mount", "--domain", "web"]))
    assert default.fork.min_free == MIN_FREE and default.fork.max_pause == 5.0
    assert not default.fork.allow_remote_workdir
    args = cli.build_parser().parse_args(["fork", "--domain", "web", "--allow-remote-workdir"])
    assert cli._job_from_args(args).fork.allow_remote_workdir
    for bad in (["--min-free", "lots"], ["--max-pause", "0"], ["--max-pause", "-3"]):
        args = cli.build_parser().parse_args(["fork", "--domain", "web", *bad])
        with pytest.raises(UsageError, match=r"the command line --(min-free|max-pause): "
                                             "expected"):
            cli._job_from_args(args)


def test_recover_passes_force_on(monkeypatch, capsys):
    seen = []

    def fake_recover_all(force=False):
        seen.append(force)
        return [Recovery("web", ["left alone: mounted at /mnt/web, waiting for `kvmsnap "
                                 "release`"])]

    monkeypatch.setattr(recovery, "recover_all", fake_recover_all)
    assert cli.main(["recover"]) == cli.EXIT_OK
    assert cli.main(["recover", "--force"]) == cli.EXIT_OK
    assert seen == [False, True]
    assert "web: left alone: mounted at /mnt/web" in capsys.readouterr().out


# -- a config file and the command line -------------------------------------------------------
CONFIG = """
[defaults]
shutdown_timeout = 100
[[vm]]
name = "web"
qmp = "/run/web.qmp"
archivers = ["b"]
mode = "image"
shutdown_timeout = 600
[[vm]]
domain = "db"
archivers = ["b"]
[archiver.b]
type = "borg"
repository = "/srv/borg"
"""


@pytest.fixture
def planned(monkeypatch, tmp_path):
    """The jobs a --dry-run backup plans, in order (nothing is touched)."""
    seen: list[BackupJob] = []

    def fake_plan(job: BackupJob) -> Plan:
        seen.append(job)
        return Plan(job.name, 1, [], [], [], "/mnt")

    monkeypatch.setattr(pipeline, "plan", fake_plan)
    (tmp_path / "kvmsnap.toml").write_text(CONFIG)
    return seen


def test_command_line_options_win_over_the_config_for_every_vm(planned, tmp_path):
    config = str(tmp_path / "kvmsnap.toml")
    assert cli.main(["backup", "--config", config, "--dry-run"]) == cli.EXIT_OK
    assert [j.fork.shutdown.timeout for j in planned] == [600, 100]
    assert [j.targets[0].mode for j in planned] == [Mode.IMAGE, Mode.FILES]
    planned.clear()
    assert cli.main(["backup", "--config", config, "--dry-run", "--shutdown-timeout", "30",
                     "--mode", "both", "--method", "stop-and-copy", "--max-pause", "9",
                     "--no-collapse-huge-pages", "--libvirt-uri", "qemu:///session"]) == 0
    assert [j.fork.shutdown.timeout for j in planned] == [30, 30]
    assert [j.targets[0].mode for j in planned] == [Mode.BOTH, Mode.BOTH]
    assert {(j.fork.method, j.fork.max_pause, j.fork.collapse_huge_pages) for j in planned} \
        == {(RamMethod.STOP_AND_COPY, 9.0, False)}
    assert planned[1].libvirt_uri == "qemu:///session"


@pytest.mark.parametrize("option", [["--name", "x"], ["--pid", "7"], ["--qmp", "/q"],
                                    ["--borg", "/b"]])
def test_options_that_name_one_vm_are_refused_with_a_config(planned, tmp_path, capsys,
                                                            option):
    code = cli.main(["backup", "--config", str(tmp_path / "kvmsnap.toml"), *option])
    assert code == cli.EXIT_ERROR and planned == []
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kvmsnap: error: --config cannot be combined with {option[0]}")


def test_the_help_says_the_command_line_wins(capsys):
    with pytest.raises(SystemExit):
        cli.main(["backup", "--help"])
    assert "when given, win over it for every VM" in " ".join(capsys.readouterr().out.split())


def test_config_validate_exits_0_or_2_with_one_line(tmp_path, capsys):
    good = tmp_path / "kvmsnap.toml"
    good.write_text(CONFIG)
    assert cli.main(["config", "validate", "--config", str(good)]) == cli.EXIT_OK
    assert capsys.readouterr().out == f"{good}: valid; 2 VM(s): web, db\n"
    good.write_text(CONFIG.replace('repository = "/srv/borg"', 'timeout = "1h"'))
    assert cli.main(["config", "validate", "--config", str(good)]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.splitlines() == [
        f'kvmsnap: error: {good} [archiver.b] timeout: expected a number of seconds above 0, '
        'got "1h" (fix: write timeout = 86400)']


def test_the_example_printed_validates(tmp_path, capsys):
    assert cli.main(["config", "example"]) == cli.EXIT_OK
    example = tmp_path / "example.toml"
    example.write_text(capsys.readouterr().out)
    assert cli.main(["config", "validate", "--config", str(example), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"config": str(example),
                                                   "vms": ["web", "db"]}


def test_config_validate_reads_the_one_config_path_by_default():
    args = cli.build_parser().parse_args(["config", "validate"])
    assert args.config == "/etc/kvmsnap/kvmsnap.toml" == str(DEFAULT_CONFIG)


# -- options every command takes, before or after it ------------------------------------------
@pytest.mark.parametrize("argv", [["--debug", "--json", "-q", "recover"],
                                  ["recover", "--debug", "--json", "-q"],
                                  ["--debug", "recover", "--json", "-q"]])
def test_debug_json_and_quiet_go_before_or_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.debug, args.json, args.quiet) == (True, True, True)
    args = cli.build_parser().parse_args(["recover"])
    assert (args.debug, args.json, args.quiet) == (False, False, False)


def test_a_skip_says_skipped_not_error(tmp_path, capsys):
    code = cli.main(["mount", "--qmp", str(tmp_path / "gone.qmp"), "--skip-missing"])
    assert code == cli.EXIT_SKIP
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("kvmsnap: skipped: ") and "error" not in line


# -- the VM's default name -------------------------------------------------------------------
class NameSession:
    """Answers the two questions the default name needs."""

    def __init__(self, name: str = "", uuid: str = "00000000-0000-0000-0000-000000000000"):
        self.answers = {"query-name": {"name": name} if name else {},
                        "query-uuid": {"UUID": uuid}}

    def execute(self, command: str, arguments: object = None) -> dict:
        return self.answers[command]


def test_a_vm_is_named_by_qemu_then_its_uuid_then_the_socket():
    socket = Path("/run/qemu/web/qmp.sock")
    assert vm_name(NameSession("web"), socket) == "web"  # -name web
    uuid = "5f1c1c0e-93a4-4d77-8a5c-8f1f8f3d0a11"
    assert vm_name(NameSession(uuid=uuid), socket) == uuid  # -uuid, no -name
    assert vm_name(NameSession(), socket) == "qmp"  # neither: the socket's stem, last


def test_without_name_the_job_takes_the_vms_own(tmp_path):
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "qmp.sock"))
    listening.close()
    args = cli.build_parser().parse_args(["fork", "--qmp", str(tmp_path / "qmp.sock")])
    job = cli._job_from_args(args)
    assert job.name == str(tmp_path / "qmp.sock") and not job.name_given
    assert job.named("web").name == "web"
    named = cli._job_from_args(cli.build_parser().parse_args(
        ["fork", "--qmp", str(tmp_path / "qmp.sock"), "--name", "db"]))
    assert named.named("web").name == "db"
