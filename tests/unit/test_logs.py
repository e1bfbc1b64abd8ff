"""Log lines away from a terminal: a timestamp and the VM on each, per thread."""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading

import pytest

from kvmsnap_plugin.cli import setup_logging
from kvmsnap_plugin.run import logs
from kvmsnap_plugin.run.logs import vm_context


@pytest.fixture
def captured(monkeypatch, capsys):
    """Root logging restored afterwards; stderr is pytest's capture (not a tty)."""
    monkeypatch.delenv("KVMSNAP_LOG", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield capsys
    root.handlers[:], level = saved
    root.setLevel(level)


def test_off_a_terminal_every_line_has_a_timestamp_and_its_vm(captured):
    setup_logging(debug=False, quiet=False)
    log = logging.getLogger("kvmsnap_plugin.fork.engine")
    log.info("outside any VM")
    barrier = threading.Barrier(2)

    def back_up(name: str) -> None:
        with vm_context(name):
            barrier.wait()  # both VMs' contexts are live at once
            log.info("pressing the power button")
            barrier.wait()
            log.warning("the clone is slow")

    threads = [threading.Thread(target=back_up, args=(n,)) for n in ("web", "db")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = captured.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} kvmsnap\[\d+\] "
    assert re.fullmatch(stamp + r"INFO vm=-: outside any VM", lines[0]), lines[0]
    for vm in ("web", "db"):
        assert sum(bool(re.fullmatch(stamp + rf"(INFO|WARNING) vm={vm}: .+", line))
                   for line in lines) == 2, lines
    assert len(lines) == 5


def test_a_terminal_gets_the_short_form_and_a_forced_choice_wins(captured, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert logs.choose() == "terminal"
    setup_logging(debug=False, quiet=False)
    with vm_context("web"):
        logging.getLogger("kvmsnap_plugin").info("forked")
    assert captured.readouterr().err == "kvmsnap: web: forked\n"
    monkeypatch.setenv("KVMSNAP_LOG", "stderr")
    assert logs.choose() == "stderr"
    assert logs.choose("journal") == "journal"


def test_without_a_journal_or_syslog_it_falls_back_to_stderr_with_priorities(
        captured, monkeypatch, tmp_path):
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", tmp_path / "no-log-socket")
    monkeypatch.setitem(sys.modules, "systemd", None)  # python3-systemd not importable
    setup_logging(debug=False, quiet=False, destination="journal")
    with vm_context("db"):
        logging.getLogger("kvmsnap_plugin").error("archive failed")
    assert captured.readouterr().err == "<3>kvmsnap: db: archive failed\n"


def test_under_systemd_stderr_is_recognised_as_the_journal(monkeypatch, tmp_path):
    out = (tmp_path / "stream").open("w")
    monkeypatch.setattr(sys, "stderr", out)
    st = (tmp_path / "stream").stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    monkeypatch.delenv("KVMSNAP_LOG", raising=False)
    assert logs.choose() == "journal"
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # another stream
    assert logs.choose() == "stderr"
    out.close()


def test_syslog_gets_the_vm_and_the_priority(captured, monkeypatch, tmp_path):
    address = tmp_path / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(5)
    monkeypatch.setattr(logs, "SYSLOG_SOCKET", address)
    try:
        setup_logging(debug=False, quiet=False, destination="syslog")
        with vm_context("web"):
            logging.getLogger("kvmsnap_plugin").warning("clone slow")
        line = receiver.recv(4096)
    finally:
        logging.getLogger().handlers[0].close()
        receiver.close()
    assert re.fullmatch(rb"<12>kvmsnap\[\d+\]: web: clone slow\x00", line), line
    assert captured.readouterr().err == ""
