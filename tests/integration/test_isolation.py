"""The clone is isolated and the guest's secrets are handled with care."""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import threading
from pathlib import Path

import pytest

from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.model import BackupJob, ForkOptions
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.journal import state_dir
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu


class Listener:
    """A TCP server on the host's loopback that records what reaches it."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.5)
        self.port = self.server.getsockname()[1]
        self.received: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    self.received.append(conn.recv(4096).decode(errors="replace"))

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.server.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def run(vm, tmp_path, *plugins):
    job = BackupJob("demo", vm.paths.backup_qmp,
                    ForkOptions(workdir=tmp_path / "work", clone_console=tmp_path / "clone.log"))
    return backup(job, Hooks(plugin_manager(list(plugins), entry_points=False)))


def test_the_clone_reaches_no_network_while_the_parent_can(start_demo, tmp_path, listener):
    vm = start_demo(callhome=listener.port)  # the parent's network is not restricted
    vm.wait_counter(5)
    report = run(vm, tmp_path)
    assert report.clean
    clone_console = (tmp_path / "clone.log").read_text()
    assert "KVMSNAP-CALLHOME-DONE carrier=0" in clone_console  # the cable was unplugged
    assert "KVMSNAP-CALLED-HOME" not in clone_console
    assert listener.received == []  # nothing from the clone arrived on the host
    # The positive control: the parent, pressed the same way, does reach the host.
    vm.power_off_cleanly()
    assert "KVMSNAP-CALLED-HOME" in vm.console()
    assert any("carrier 1" in message for message in listener.received)


class SecretsInspector:
    """Checks, from inside the run, how the RAM state and the sockets are kept."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    @hookimpl
    def kvmsnap_snapshot(self, fork):
        state = fork.state_file
        self.seen["state_mode"] = stat.S_IMODE(state.stat().st_mode)
        self.seen["state_dir_mode"] = stat.S_IMODE(state.parent.stat().st_mode)
        [journal] = state_dir().glob("*.json")
        sockets = Path(json.loads(journal.read_text())["sockets"])
        self.seen["socket_dir_mode"] = stat.S_IMODE(sockets.stat().st_mode)
        self.seen["journal_mode"] = stat.S_IMODE(journal.stat().st_mode)

    @hookimpl
    def kvmsnap_post_shutdown(self, fork):
        self.seen["state_left"] = fork.state_file.exists()


def test_the_ram_state_is_private_and_removed_once_loaded(start_demo, tmp_path):
    vm = start_demo()
    inspector = SecretsInspector()
    run(vm, tmp_path, inspector)
    assert inspector.seen == {"state_mode": 0o600, "state_dir_mode": 0o700,
                              "socket_dir_mode": 0o700, "journal_mode": 0o600,
                              "state_left": False}
