from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from kvmsnap_plugin.errors import HostError, ProcessError
from kvmsnap_plugin.host import process, secrets


def test_secrets_from_the_environment_are_masked_in_errors():
    env = {"BORG_PASSPHRASE": "hunter2-secret"}
    with pytest.raises(ProcessError) as info:
        process.run(["sh", "-c", 'echo "bad passphrase $BORG_PASSPHRASE" >&2; exit 3'],
                    timeout=10, env=env)
    assert "hunter2-secret" not in str(info.value)
    assert "hunter2-secret" not in info.value.stderr
    assert secrets.MASK in info.value.stderr
    assert info.value.returncode == 3


def test_describe_masks_secrets_in_argv():
    shown = process.describe(["tool", "--pass", "s3cret"], {"RESTIC_PASSWORD": "s3cret"})
    assert "s3cret" not in shown


def test_timeout_is_an_error_with_a_hint():
    with pytest.raises(ProcessError, match=r"did not finish within 0\.2 s"):
        process.run(["sleep", "5"], timeout=0.2)


def test_missing_program_says_what_to_install():
    with pytest.raises(HostError) as info:
        process.find_program("no-such-program-kvmsnap", "kvmsnap-pkg")
    assert "apt-get install kvmsnap-pkg" in info.value.hint


def test_arguments_never_go_through_a_shell(tmp_path):
    evil = f"x; touch {tmp_path}/pwned"
    result = process.run(["echo", evil], timeout=10)
    assert result.stdout.strip() == evil
    assert not (tmp_path / "pwned").exists()


# -- the sh layer (restic's): the same masking, failures and time limits -----------------------
def test_sh_program_runs_and_masks_secrets_in_failures():
    env = {"RESTIC_PASSWORD": "sh-secret-42"}
    shell = process.ShProgram("sh", "dash", env=env, timeout=10)
    assert shell.run(["-c", "echo hello"]).stdout == "hello\n"
    assert shell.run(["-c", "exit 3"], ok_codes=(0, 3)).returncode == 3
    with pytest.raises(ProcessError, match="failed with exit code 2") as info:
        shell.run(["-c", 'echo "no: $RESTIC_PASSWORD" >&2; exit 2'])
    assert "sh-secret-42" not in info.value.stderr
    assert secrets.MASK in info.value.stderr
    assert info.value.returncode == 2


def test_sh_program_times_out_like_run():
    shell = process.ShProgram("sh", "dash", timeout=0.2)
    with pytest.raises(ProcessError, match=r"did not finish within 0\.2 s"):
        shell.run(["-c", "sleep 5"])


def test_sh_program_writes_large_output_to_a_file(tmp_path):
    shell = process.ShProgram("sh", "dash", timeout=10)
    with open(tmp_path / "out", "wb") as out:
        shell.run_to_file(["-c", "head -c 1000000 /dev/zero"], out)
    assert (tmp_path / "out").stat().st_size == 1000000
    with open(tmp_path / "out", "wb") as out, pytest.raises(ProcessError):
        shell.run_to_file(["-c", "exit 1"], out)


def test_sh_program_started_reads_its_stdin_and_is_registered():
    shell = process.ShProgram("sh", "dash", timeout=10)
    read_end, write_end = os.pipe()
    running = shell.start(["-c", "wc -c"], stdin_fd=read_end)
    os.close(read_end)
    assert running.pid in process.SPAWNED_PIDS
    os.write(write_end, b"12345")
    os.close(write_end)
    assert shell.finish(running).stdout.strip() == "5"


def test_sh_program_abort_kills_at_once_with_stdin_still_open():
    shell = process.ShProgram("sh", "dash", timeout=30)
    read_end, write_end = os.pipe()
    running = shell.start(["-c", "exec cat >/dev/null"], stdin_fd=read_end)
    os.close(read_end)
    started = time.monotonic()
    shell.abort(running)
    assert time.monotonic() - started < 3
    assert process.same_process(process.identity(running.pid)) is None
    os.close(write_end)


# -- ending: one ladder, for our children and for PIDs ---------------------------------------
def test_end_a_child_that_obeys_sigterm():
    proc = process.spawn(["sleep", "30"])
    assert process.end(proc, grace=5) == "terminate"
    assert proc.returncode == -signal.SIGTERM


def test_end_a_child_that_ignores_sigterm_is_killed_after_grace():
    proc = process.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"])
    time.sleep(0.2)  # the trap is set
    assert process.end(proc, grace=0.3) == "kill"
    assert proc.returncode == -signal.SIGKILL
    assert process.stop(proc) == -signal.SIGKILL  # ending it again is harmless


def test_end_pid_of_a_process_known_by_pid_only():
    proc = process.spawn(["sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"])
    time.sleep(0.2)
    recorded = process.identity(proc.pid)
    assert process.same_process(recorded) == proc.pid
    process.end_pid(proc.pid, grace=0.3)
    assert process.same_process(recorded) is None  # a zombie until reaped
    proc.wait(5)
    assert proc.returncode == -signal.SIGKILL


def test_end_without_sigterm_first():
    proc = process.spawn(["sleep", "30"])
    assert process.end(proc.pid, soft=False, grace=5) == "kill"
    proc.wait(5)
    assert proc.returncode == -signal.SIGKILL


# -- identities: a PID, its start time and the boot ----------------------------------------
def test_an_identity_names_the_boot_and_finds_its_process_again():
    proc = process.spawn(["sleep", "30"])
    try:
        recorded = process.identity(proc.pid)
        pid, start, boot = recorded.split(":")
        assert int(pid) == proc.pid and int(start) > 0
        assert boot == process.BOOT_ID_FILE.read_text().strip()
        assert process.same_process(recorded) == proc.pid
    finally:
        process.end(proc)
    assert process.same_process(recorded) is None


def test_an_identity_from_an_earlier_boot_never_matches(monkeypatch):
    """After a reboot PIDs and start times begin again: the same pair is another process."""
    recorded = process.identity(os.getpid())
    assert process.same_process(recorded) == os.getpid()
    monkeypatch.setattr(process, "boot_id", lambda: "another-boot")
    assert process.same_process(recorded) is None
    # ... while what is recorded in this (new) boot matches
    assert process.same_process(process.identity(os.getpid())) == os.getpid()


def test_identities_recorded_before_the_boot_id_still_read():
    pid, start, _boot = process.identity(os.getpid()).split(":")
    assert process.same_process(f"{pid}:{start}") == os.getpid()
    assert process.same_process(f"{pid}:{int(start) + 1}") is None  # a PID reused
    assert process.same_process(f"{pid}:gone") is None
    assert process.same_process(None) is None and process.same_process("") is None


def test_a_process_that_is_gone_has_a_gone_identity():
    proc = process.spawn(["true"])
    proc.wait(5)
    assert process.identity(proc.pid) == f"{proc.pid}:gone"


# -- what is never shown: URL passwords, secrets on a command line ------------------------------
@pytest.mark.parametrize(("url", "shown"), [
    ("sftp://bob:pw-sftp@host/srv/repo", "sftp://bob:***@host/srv/repo"),
    ("ssh://bob:pw-ssh@host:22/./repo::archive", "ssh://bob:***@host:22/./repo::archive"),
    ("rest:https://bob:pw-rest@host:8000/repo", "rest:https://bob:***@host:8000/repo"),
    ("s3:https://KEY:pw-s3/with/slash@s3.example/bucket", "s3:https://KEY:***@s3.example/bucket"),
    ("iscsi://bob%pw-iscsi@10.0.0.1/iqn.x/0", "iscsi://bob%***@10.0.0.1/iqn.x/0"),
    ("https://host:8000/repo", "https://host:8000/repo"),  # a port is no password
    ("sftp://host:22/repo, then mail a@b", "sftp://host:22/repo, then mail a@b"),
])
def test_a_url_password_is_masked_and_nothing_else(url, shown):
    assert secrets.mask(url, []) == shown


def test_a_url_password_is_masked_in_the_logged_argv_and_in_errors(caplog):
    url = "sftp://bob:pw-in-url@host/repo"
    caplog.set_level("DEBUG", logger=process.__name__)
    with pytest.raises(ProcessError) as info:
        process.run(["sh", "-c", 'echo "no repository at $0" >&2; exit 2', url], timeout=10)
    assert "sftp://bob:***@host/repo" in caplog.text
    for text in (caplog.text, str(info.value), info.value.hint, info.value.stderr):
        assert "pw-in-url" not in text


def test_secrets_of_a_qemu_command_line_are_masked_in_the_logged_argv(caplog):
    caplog.set_level("DEBUG", logger=process.__name__)
    process.run(["true", "--object", "secret,id=s0,data=pw-luks", "-object",
                 '{"qom-type":"secret","id":"s1","data":"pw-json","format":"base64"}',
                 "-spice", "port=5930,password=pw-spice"], timeout=10)
    proc = process.spawn(["sleep", "0", "-drive", "file=rbd:p/i:key=pw-rbd==:conf=/c"])
    process.stop(proc)
    for secret in ("pw-luks", "pw-json", "pw-spice", "pw-rbd"):
        assert secret not in caplog.text
    assert "secret,id=s0,data=***" in caplog.text and '"id":"s1"' in caplog.text


def test_the_sh_layer_masks_url_passwords_too(caplog):
    caplog.set_level("DEBUG", logger=process.__name__)
    shell = process.ShProgram("sh", "dash", timeout=10)
    with pytest.raises(ProcessError) as info:
        shell.run(["-c", 'echo "Fatal: unable to open $0" >&2; exit 1',
                   "rest:https://bob:pw-rest@host/"])
    for text in (caplog.text, str(info.value), info.value.hint, info.value.stderr):
        assert "pw-rest" not in text
    assert "rest:https://bob:***@host/" in info.value.stderr


def test_every_log_line_and_error_kvmsnap_prints_is_masked(capsys, monkeypatch):
    from kvmsnap_plugin.cli import setup_logging

    monkeypatch.setenv("BORG_PASSPHRASE", "pw-env-42")
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    try:
        setup_logging(debug=False, quiet=False)
        logging.getLogger("kvmsnap_plugin.run.restore").info(
            "extracting %s (passphrase %s)", "ssh://bob:pw-url@host/./repo::a", "pw-env-42")
        try:
            raise ValueError("from sftp://bob:pw-tb@host/x")
        except ValueError:
            logging.getLogger("kvmsnap_plugin").exception("failed")
    finally:
        logging.getLogger().handlers[:], level = saved
        logging.getLogger().setLevel(level)
    err = capsys.readouterr().err
    assert "extracting ssh://bob:***@host/./repo::a (passphrase ***)" in err
    assert "sftp://bob:***@host/x" in err  # the traceback too
    assert not [s for s in ("pw-url", "pw-env-42", "pw-tb") if s in err]
    assert secrets.masked("no repository at rest:https://u:pw-9@h/") == \
        "no repository at rest:https://u:***@h/"
