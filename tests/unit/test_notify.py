"""Commands by outcome: the right one runs, it learns the result, and it cannot change it."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvmsnap_plugin.model import BackupJob, VmCommands, VmOutcome
from kvmsnap_plugin.run.notify import after_vm

CHECKOUT = Path(__file__).resolve().parents[2]
DUMP_ENV = ("import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
            "if k.startswith('KVMSNAP_')}, open(sys.argv[1], 'w'))")


def dumper(path) -> tuple[str, ...]:
    return (sys.executable, "-c", DUMP_ENV, str(path))


def job(**commands) -> BackupJob:
    return BackupJob("web", None, domain="web", commands=VmCommands(**commands))


def outcome(code: int) -> VmOutcome:
    return VmOutcome("web", code, 100.0, 160.0, None,
                     "the clone did not shut down" if code == 2 else "", "")


def test_each_outcome_runs_its_command_with_the_result_in_its_environment(tmp_path):
    commands = {f"on_{kind}": dumper(tmp_path / kind)
                for kind in ("success", "warning", "failure")}
    for code in (0, 1, 2):
        assert after_vm(job(**commands), outcome(code))
    for kind, code, status in (("success", 0, "ok"), ("warning", 1, "warning"),
                               ("failure", 2, "error")):
        env = json.loads((tmp_path / kind).read_text())
        assert env["KVMSNAP_VM"] == "web"
        assert env["KVMSNAP_STATUS"] == status
        assert env["KVMSNAP_EXIT_CODE"] == str(code)
        result = json.loads(env["KVMSNAP_RESULT"])
        assert result == outcome(code).as_dict()
    assert json.loads(json.loads((tmp_path / "failure").read_text())["KVMSNAP_RESULT"])[
        "error"] == "the clone did not shut down"


def test_a_warning_without_its_own_command_runs_the_success_one(tmp_path):
    done = job(on_success=dumper(tmp_path / "s"), on_failure=dumper(tmp_path / "f"))
    after_vm(done, outcome(1))
    assert json.loads((tmp_path / "s").read_text())["KVMSNAP_STATUS"] == "warning"
    after_vm(done, outcome(75))  # skipped
    assert json.loads((tmp_path / "s").read_text())["KVMSNAP_STATUS"] == "skipped"
    assert not (tmp_path / "f").exists()
    assert after_vm(job(), outcome(2))  # no command at all: nothing to run


def test_a_failing_command_is_a_warning_not_an_error(caplog):
    caplog.set_level(logging.WARNING)
    failing = job(on_failure=(sys.executable, "-c", "import sys; sys.exit('hc down')"))
    assert after_vm(failing, outcome(2)) is False
    missing = job(on_success=("/nonexistent/kvmsnap-notify",))
    assert after_vm(missing, outcome(0)) is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("the backup's result stands" in w for w in warnings)
    assert "hc down" in warnings[0]


def test_a_hanging_command_is_stopped_at_its_timeout(caplog):
    hanging = job(on_success=(sys.executable, "-c", "import time; time.sleep(60)"))
    started = time.monotonic()
    assert after_vm(hanging, outcome(0), timeout=1.0) is False
    assert time.monotonic() - started < 10


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    """A local stand-in for healthchecks.io and ntfy: (base URL, requests received)."""
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_contrib_notify_pings_healthchecks_and_ntfy(http_server, monkeypatch):
    base, received = http_server
    monkeypatch.setenv("HC_PING_URL", f"{base}/ping-key")
    monkeypatch.setenv("NTFY_URL", f"{base}/kvmsnap-topic")
    notify = (str(CHECKOUT / "contrib" / "kvmsnap-notify"),)
    every = job(on_success=notify, on_failure=notify)
    assert after_vm(every, outcome(0))
    assert [r[0] for r in received] == ["/ping-key/web?create=1"]  # ok: no ntfy message
    assert json.loads(received[0][2]) == outcome(0).as_dict()
    received.clear()
    assert after_vm(every, outcome(2))
    paths = sorted(r[0] for r in received)
    assert paths == ["/kvmsnap-topic", "/ping-key/web/fail?create=1"]
    ntfy = next(r for r in received if r[0] == "/kvmsnap-topic")
    assert ntfy[1]["Title"] == "kvmsnap web: error" and ntfy[1]["Priority"] == "high"
    assert b"the clone did not shut down" in ntfy[2]


def test_contrib_notify_unreachable_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("HC_PING_URL", "http://127.0.0.1:9/ping-key")  # discard: refused
    notify = (str(CHECKOUT / "contrib" / "kvmsnap-notify"),)
    assert after_vm(job(on_success=notify), outcome(0)) is False
    assert "the backup's result stands" in caplog.text
