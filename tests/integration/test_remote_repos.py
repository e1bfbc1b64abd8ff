"""Remote repositories for real: borg over ssh, restic over sftp and over the REST protocol,
each served by a daemon the test starts on 127.0.0.1 (and always stops), and a repository
that goes away in the middle of a backup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, clone_pid, kvmsnap

from kvmsnap_demo.testing import BORG_PASSPHRASE, RESTIC_PASSWORD
from kvmsnap_plugin.host import process

pytestmark = pytest.mark.qemu

BIN = Path(sys.executable).parent
#: rclone's HTTP password: in restic's repository URL, so it must be masked like a passphrase
REST_PASSWORD = "rest-secret-kvmsnap-test"
SSH_OPTIONS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes " \
              "-o IdentitiesOnly=yes -o LogLevel=ERROR"


# -- daemons on 127.0.0.1 -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's per-connection children, the `borg serve` they run)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def read_bytes(pid: int) -> int:
    """What process ``pid`` has read so far (from its stdin pipe too)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


class Daemon:
    """A server on 127.0.0.1:port run by the test; ``kill`` takes it down at once, the
    connections it serves too (a repository host that goes away)."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.argv, self.port, self.log = argv, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.argv[0]} did not listen: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is None:
            return
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill()


@dataclass
class SshServer:
    daemon: Daemon
    key: Path

    @property
    def ssh(self) -> str:
        """The ssh command line a client uses (BORG_RSH, restic's sftp.command)."""
        return f"ssh -i {self.key} -p {self.daemon.port} {SSH_OPTIONS}"


@pytest.fixture
def ssh_server(tmp_path: Path) -> Iterator[SshServer]:
    """sshd on a free port of 127.0.0.1: a temporary host key, root's login by one key."""
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        process.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmsnap-test",
                     "-f", keys / name], timeout=60)
    (keys / "authorized_keys").write_bytes((keys / "client_key.pub").read_bytes())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {keys / 'host_key'}
AuthorizedKeysFile {keys / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    daemon = Daemon(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], port,
                    tmp_path / "sshd.log")
    with running(daemon):
        yield SshServer(daemon, keys / "client_key")


@pytest.fixture
def rest_server(tmp_path: Path) -> Iterator[Daemon]:
    """`rclone serve restic` on a free port of 127.0.0.1, serving a new directory to one
    user with a password (HTTP basic authentication)."""
    (tmp_path / "rest").mkdir()
    port = free_port()
    daemon = Daemon(["rclone", "serve", "restic", "--addr", f"127.0.0.1:{port}",
                     "--user", "kvmsnap", "--pass", REST_PASSWORD, str(tmp_path / "rest")],
                    port, tmp_path / "rclone.log")
    with running(daemon):
        yield daemon


# -- clients --------------------------------------------------------------------------------------
@pytest.fixture
def borg_over_ssh(ssh_server: SshServer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> str:
    """An empty borg repository on the ssh server; passphrase and ssh command in the env."""
    monkeypatch.setenv("BORG_PASSPHRASE", BORG_PASSPHRASE)
    monkeypatch.setenv("BORG_BASE_DIR", str(tmp_path / "borg-base"))
    monkeypatch.setenv("BORG_RSH", ssh_server.ssh)
    monkeypatch.setenv("BORG_REMOTE_PATH", str(BIN / "borg"))  # not on sshd's PATH
    repository = f"ssh://root@127.0.0.1:{ssh_server.daemon.port}{tmp_path}/remote.borg"
    borg("init", "--encryption=repokey", repository)
    return repository


def borg(*args: object) -> str:
    return process.run([str(BIN / "borg"), *args], timeout=300).stdout


@dataclass
class ResticRemote:
    repository: str
    options: list[str]

    def __call__(self, *args: str) -> str:
        options = [a for option in self.options for a in ("-o", option)]
        return process.run(["restic", "-r", self.repository, *options, *args],
                           timeout=300).stdout


@pytest.fixture
def restic_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESTIC_PASSWORD", RESTIC_PASSWORD)
    monkeypatch.setenv("RESTIC_CACHE_DIR", str(tmp_path / "restic-cache"))


def restic_over_sftp(server: SshServer, tmp_path: Path) -> ResticRemote:
    remote = ResticRemote(f"sftp:root@127.0.0.1:{tmp_path}/remote.restic",
                          [f"sftp.command={server.ssh} root@127.0.0.1 -s sftp"])
    remote("init")
    return remote


def restic_over_rest(server: Daemon) -> ResticRemote:
    remote = ResticRemote(f"rest:http://kvmsnap:{REST_PASSWORD}@127.0.0.1:{server.port}/demo/",
                          [])
    remote("init")
    return remote


def write_config(tmp_path: Path, vm, archiver: str, mode: str = "files") -> Path:
    config = tmp_path / "kvmsnap.toml"
    config.write_text(f"""
[defaults]
mode = "{mode}"
workdir = "{tmp_path / 'work'}"

[[vm]]
name = "demo"
qmp = "{vm.paths.backup_qmp}"
archivers = ["remote"]

[archiver.remote]
{archiver}
""")
    return config


def restic_archiver(remote: ResticRemote, *extra_args: str) -> str:
    return (f'type = "restic"\nrepository = "{remote.repository}"\n'
            f"options = {json.dumps(remote.options)}\nextra_args = {json.dumps(extra_args)}")


def assert_no_secrets(done: subprocess.CompletedProcess) -> None:
    for secret in (BORG_PASSPHRASE, RESTIC_PASSWORD, REST_PASSWORD):
        assert secret not in done.stdout + done.stderr


# -- round trips ----------------------------------------------------------------------------------
def test_borg_over_ssh_round_trip(start_demo, tmp_path, borg_over_ssh):
    vm = start_demo()
    before = vm.wait_counter(10)
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "demo",
                   "--borg", borg_over_ssh, "--workdir", str(tmp_path / "work"), "--debug")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_secrets(done)
    [archive] = json.loads(borg("list", "--json", borg_over_ssh))["archives"]
    log = borg("extract", "--stdout", f"{borg_over_ssh}::{archive['name']}",
               "vdisk0/workload.log").splitlines()
    assert log[:before] == [f"line {i}" for i in range(1, before + 1)]


@pytest.mark.parametrize("protocol", ["sftp", "rest"])
def test_restic_remote_round_trip(protocol, start_demo, tmp_path, restic_env, request):
    remote = restic_over_sftp(request.getfixturevalue("ssh_server"), tmp_path) \
        if protocol == "sftp" else restic_over_rest(request.getfixturevalue("rest_server"))
    vm = start_demo()
    before = vm.wait_counter(10)
    config = write_config(tmp_path, vm, restic_archiver(remote))
    done = kvmsnap("backup", "--config", str(config), "--debug")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_no_secrets(done)
    [snapshot] = json.loads(remote("snapshots", "--json"))
    assert {"kvmsnap", "vm:demo", "files"} <= set(snapshot["tags"])
    nodes = [json.loads(line) for line in remote("ls", "--json", "latest").splitlines()]
    [path] = [n["path"] for n in nodes if n.get("path", "").endswith("/vdisk0/workload.log")]
    log = remote("dump", "latest", path).splitlines()
    assert log[:before] == [f"line {i}" for i in range(1, before + 1)]


# -- a repository that goes away mid-backup -------------------------------------------------------
def start_kvmsnap(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmsnap_plugin.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(found, what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert proc.poll() is None, f"kvmsnap ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=900)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def disk_dir_listing(vm) -> list[str]:
    return sorted(p.name for p in vm.paths.disks[0].parent.iterdir())


def assert_parent_fine(vm, tmp_path: Path, disk_dir_before: list[str]) -> None:
    """Running on its own image again (the overlay committed back), and nothing left:
    no clone, mount, loop device, overlay or run directory."""
    assert vm.qmp.runstate() == "running"
    assert [b["inserted"]["file"] for b in vm.qmp.execute("query-block")] == \
        [str(vm.paths.disks[0])]
    assert disk_dir_listing(vm) == disk_dir_before
    assert clone_pid(tmp_path / "work") is None
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert str(tmp_path) not in process.run(["losetup", "-a"], timeout=30).stdout
    assert not list((tmp_path / "work").glob("run-*"))


def test_borg_over_ssh_gone_mid_backup(start_demo, tmp_path, ssh_server, borg_over_ssh):
    vm = start_demo()
    vm.wait_counter(5)
    disk_dir_before = disk_dir_listing(vm)
    # 64 KiB/s up: the image archive takes long enough to pull the server from under it
    config = write_config(tmp_path, vm, f'type = "borg"\nrepository = "{borg_over_ssh}"\n'
                          'extra_args = ["--upload-ratelimit", "64"]', mode="image")
    proc = start_kvmsnap("backup", "--config", str(config))
    sshd = ssh_server.daemon

    def borg_create_serving() -> bool:  # `borg serve` for the create (after borg info's)
        return any("serve" in cmdline(pid) for pid in descendants(sshd.proc.pid)) and any(
            "create" in cmdline(pid) and borg_over_ssh in cmdline(pid)
            for pid in descendants(proc.pid))

    wait_until(borg_create_serving, "borg create", proc)
    time.sleep(1)
    sshd.kill()
    failed = finish(proc)
    line = assert_one_line_error(failed, "borg")
    assert_no_secrets(failed)
    assert_parent_fine(vm, tmp_path, disk_dir_before)
    sshd.start()  # the repository host is back
    assert json.loads(borg("list", "--json", borg_over_ssh))["archives"] == [], line
    # borg writes a checkpoint only every 30 min (or when interrupted by a signal): a
    # killed connection leaves none, and one would not count as an archive anyway
    leftovers = json.loads(borg("list", "--json", "--consider-checkpoints",
                                borg_over_ssh))["archives"]
    assert all(a["name"].endswith(".checkpoint") for a in leftovers), leftovers
    print(f"error: {line}\ncheckpoints left: {[a['name'] for a in leftovers]}")
    write_config(tmp_path, vm, f'type = "borg"\nrepository = "{borg_over_ssh}"',
                 mode="image")
    again = kvmsnap("backup", "--config", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    [archive] = json.loads(borg("list", "--json", borg_over_ssh))["archives"]
    assert archive["name"].endswith("-image")
    assert_parent_fine(vm, tmp_path, disk_dir_before)
