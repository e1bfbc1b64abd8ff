from __future__ import annotations

import pytest

from kvmsnap_plugin.errors import HostError, ProcessError
from kvmsnap_plugin.host import process


def test_secrets_from_the_environment_are_masked_in_errors():
    env = {"BORG_PASSPHRASE": "hunter2-secret"}
    with pytest.raises(ProcessError) as info:
        process.run(["sh", "-c", 'echo "bad passphrase $BORG_PASSPHRASE" >&2; exit 3'],
                    timeout=10, env=env)
    assert "hunter2-secret" not in str(info.value)
    assert "hunter2-secret" not in info.value.stderr
    assert process.MASK in info.value.stderr
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
