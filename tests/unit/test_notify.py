"""Commands by outcome: the right one runs, it learns the result, and it cannot change it."""

from __future__ import annotations

import json
import logging
import sys
import time

from kvmsnap_plugin.model import BackupJob, VmCommands, VmOutcome
from kvmsnap_plugin.run.notify import after_vm

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
