from __future__ import annotations

from kvmsnap_plugin import cli
from kvmsnap_plugin.errors import HostError


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
