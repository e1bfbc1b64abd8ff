"""The clone's confinement without QEMU: the parent's binary, the clean environment, the
sandbox settings probed from the parent's monitor."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import CloneBinary
from kvmsnap_plugin.vm.confine import SANDBOX, parents_binary, sandbox_option

SECRETS = {"BORG_PASSPHRASE": "p4ss", "RESTIC_PASSWORD": "r3stic",
           "KVMSNAP_TEST_CANARY": "s3cr3t"}


@pytest.fixture
def secrets_in_our_environment(monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def sleeper():
    """A process of ours standing in for the parent QEMU."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def binary_of(pid: int, identity: str | None = None) -> CloneBinary:
    return CloneBinary(identity or process.identity(pid), os.readlink(f"/proc/{pid}/exe"),
                       (7, 2, 22), None, "sandboxed")


# -- the environment ------------------------------------------------------------------------
def test_the_clean_environment_drops_everything_but_the_allowed_set(secrets_in_our_environment):
    assert process.child_env(process.CLEAN_ENV, inherit=False) == process.CLEAN_ENV
    assert process.child_env(None)["KVMSNAP_TEST_CANARY"] == "s3cr3t"  # the default inherits


@pytest.mark.parametrize("start", ["run", "spawn"])
def test_a_program_started_clean_sees_only_the_clean_set(secrets_in_our_environment,
                                                         tmp_path, start):
    if start == "run":
        out = process.run(["env", "-0"], timeout=10, env=process.CLEAN_ENV,
                          inherit_env=False).stdout
    else:
        with open(tmp_path / "out", "wb") as sink:
            proc = process.spawn(["env", "-0"], stdout=sink, env=process.CLEAN_ENV,
                                 inherit_env=False)
            proc.wait(10)
        out = (tmp_path / "out").read_text()
    seen = dict(entry.split("=", 1) for entry in out.split("\0") if entry)
    assert seen == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


# -- the parent's own binary ----------------------------------------------------------------
def test_the_clone_runs_the_parents_binary_under_its_name(sleeper, tmp_path):
    with parents_binary(binary_of(sleeper.pid), tmp_path) as path:
        assert Path(path).name == "sleep"
        proc = subprocess.Popen(["display-name", "30"], executable=path)
        try:
            exe = os.stat(f"/proc/{proc.pid}/exe")
            parent = os.stat(f"/proc/{sleeper.pid}/exe")
            assert (exe.st_dev, exe.st_ino) == (parent.st_dev, parent.st_ino)
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep"
        finally:
            proc.kill()
            proc.wait()
    assert list(tmp_path.iterdir()) == []  # the link and its directory are gone


def test_a_reused_pid_is_refused(sleeper, tmp_path):
    """The PID is alive, but its start time is not the parent's: another process now."""
    pid, start, boot = process.identity(sleeper.pid).split(":")
    reused = binary_of(sleeper.pid, f"{pid}:{int(start) - 1}:{boot}")
    with pytest.raises(VMError, match=f"process {pid} is gone .or its PID is another"), \
            parents_binary(reused, tmp_path):
        pytest.fail("the clone would have run another process's binary")
    assert list(tmp_path.iterdir()) == []


def test_a_parent_that_is_gone_is_refused(sleeper, tmp_path):
    binary = binary_of(sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    with pytest.raises(VMError, match="is gone"), parents_binary(binary, tmp_path):
        pytest.fail("no parent, no binary")


def test_the_report_says_when_the_binary_was_replaced_on_disk():
    binary = CloneBinary("1:2:b", "/usr/bin/qemu-system-x86_64 (deleted)", (7, 2, 22),
                         None, "not sandboxed: this QEMU was built without seccomp")
    assert binary.replaced
    assert binary.describe() == (
        "/usr/bin/qemu-system-x86_64 (deleted: replaced on disk since the VM started) "
        "(QEMU 7.2.22, the parent's own); not sandboxed: this QEMU was built without seccomp")


# -- the sandbox ----------------------------------------------------------------------------
class FakeMonitor:
    """query-command-line-options as a QEMU with (or without) seccomp answers it."""

    def __init__(self, parameters: list[str] | None) -> None:
        self.parameters = parameters

    def execute(self, command, arguments=None, *, timeout=None):
        assert (command, arguments) == ("query-command-line-options", {"option": "sandbox"})
        if self.parameters is None:
            raise VMError("QMP query-command-line-options failed: invalid option name: sandbox")
        return [{"option": "sandbox",
                 "parameters": [{"name": n, "type": "string"} for n in self.parameters]}]


QEMU_ARGV = ["qemu-system-x86_64", "-m", "256"]


def test_the_full_sandbox_when_the_binary_has_every_setting():
    value, note = sandbox_option(FakeMonitor(["enable", *SANDBOX]), QEMU_ARGV)
    assert value == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    assert note == "sandboxed"


def test_no_sandbox_without_seccomp_and_the_report_says_why():
    assert sandbox_option(FakeMonitor(None), QEMU_ARGV) == (
        None, "not sandboxed: this QEMU was built without seccomp (no -sandbox)")


def test_settings_the_binary_lacks_are_left_out_and_named():
    value, note = sandbox_option(FakeMonitor(["enable", "obsolete"]), QEMU_ARGV)
    assert value == "on,obsolete=deny"
    assert "no elevateprivileges=" in note and "no spawn=" in note


@pytest.mark.parametrize("thread_context", [
    "thread-context,id=tc1,node-affinity=0",
    '{"qom-type":"thread-context","id":"tc1","cpu-affinity":[0]}',
])
def test_thread_pinning_keeps_resource_control_allowed(thread_context):
    argv = [*QEMU_ARGV, "-object", thread_context, "-object",
            "memory-backend-ram,id=m0,size=256M,prealloc=on,prealloc-context=tc1"]
    value, note = sandbox_option(FakeMonitor(list(SANDBOX)), argv)
    assert value == "on,obsolete=deny,elevateprivileges=deny,spawn=deny"
    assert note == "sandboxed (resource control allowed for the VM's thread-context object)"


def test_the_clone_keeps_only_a_root_owned_module_dir_of_the_parents_environment(tmp_path):
    from kvmsnap_plugin.vm.confine import clone_env

    modules = tmp_path / "modules"
    modules.mkdir(mode=0o755)
    writable = tmp_path / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    for directory, kept in ((modules, True), (writable, False)):
        env = {"PATH": "/bin", "QEMU_MODULE_DIR": str(directory), "BORG_PASSPHRASE": "x"}
        child = subprocess.Popen(["sleep", "30"], env=env)
        try:
            binary = CloneBinary(process.identity(child.pid), "/bin/sleep", (7, 2, 0), None, "")
            expected = {**process.CLEAN_ENV, "QEMU_MODULE_DIR": str(directory)}
            assert clone_env(binary) == (expected if kept else process.CLEAN_ENV)
        finally:
            child.kill()
            child.wait()
