from __future__ import annotations

import pytest

from kvmsnap_plugin import cli
from kvmsnap_plugin.errors import HostError, UsageError, VMError
from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    BackupJob,
    Plan,
    RamMethod,
    Recovery,
)
from kvmsnap_plugin.run import pipeline


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
def test_option_defaults_are_the_model_defaults(command):
    args = cli.build_parser().parse_args([command, "--domain", "web"])
    assert args.shutdown_timeout == SHUTDOWN_TIMEOUT and args.repress_after == REPRESS_AFTER
    assert args.libvirt_uri == DEFAULT_LIBVIRT_URI
    assert args.method == RamMethod.AUTO and args.on_unclean == "fail"
    job = cli._job_from_args(args)
    assert job.fork.shutdown.timeout == SHUTDOWN_TIMEOUT and job.libvirt_uri == DEFAULT_LIBVIRT_URI


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
    config.write_text('[[vm]]\ndomain = "bad"\n[[vm]]\ndomain = "good"\n')
    code = cli.main(["backup", "--config", str(config), "--dry-run"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_ERROR
    assert [line for line in captured.err.splitlines() if line.startswith("kvmsnap: error")] == [
        "kvmsnap: error: bad: bad is not running (fix: start it)"]
    # progress: a line as each VM starts and as it ends
    assert "kvmsnap: [2/2] good: started (1 running)" in captured.err.splitlines()
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
        with pytest.raises(UsageError, match=r"min_free|max_pause"):
            cli._job_from_args(args)


def test_recover_passes_force_on(monkeypatch, capsys):
    seen = []

    def fake_recover_all(force=False):
        seen.append(force)
        return [Recovery("web", ["left alone: mounted at /mnt/web, waiting for `kvmsnap "
                                 "release`"])]

    monkeypatch.setattr(pipeline, "recover_all", fake_recover_all)
    assert cli.main(["recover"]) == cli.EXIT_OK
    assert cli.main(["recover", "--force"]) == cli.EXIT_OK
    assert seen == [False, True]
    assert "web: left alone: mounted at /mnt/web" in capsys.readouterr().out
