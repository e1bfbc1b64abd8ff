"""The clone's network filesystems: read from /proc/mounts and detached through a fake agent."""

from __future__ import annotations

import base64
import json
import socket
import threading
from pathlib import Path

from kvmsnap_plugin.model import NetworkMount
from kvmsnap_plugin.vm.network_fs import FORCED, RELEASE_LOOP, detach_network_mounts, parse_mounts

PROC_MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
10.0.2.2:/export/a /mnt/a nfs4 rw,relatime,vers=4.2,hard,proto=tcp 0 0
//srv/share /mnt/my\\040share cifs rw,soft 0 0
10.0.2.2:/export/b /mnt/a/inner nfs rw,vers=3,soft 0 0
tmpfs /run tmpfs rw 0 0
"""


class FakeAgent:
    """A qemu-ga that answers sync, and runs ``cat`` and the release loop's launcher (exit
    ``launch_code``)."""

    def __init__(self, path: Path, launch_code: int = 0) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.launch_code = launch_code
        self.ran: list[list[str]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        channel, _ = self.server.accept()
        with channel, channel.makefile("rb") as requests:
            for line in requests:
                request = json.loads(line.lstrip(b"\xff"))
                channel.sendall(self._answer(request))

    def _answer(self, request: dict) -> bytes:
        command, args = request["execute"], request.get("arguments", {})
        if command == "guest-sync":
            return json.dumps({"return": args["id"]}).encode() + b"\n"
        if command == "guest-ping":
            return b'{"return": {}}\n'
        if command == "guest-exec":
            self.ran.append([args["path"], *args["arg"]])
            reply: object = {"pid": len(self.ran)}
        else:  # guest-exec-status
            argv = self.ran[args["pid"] - 1]
            out = PROC_MOUNTS if argv[0] == "cat" else ""
            reply = {"exited": True, "exitcode": 0 if argv[0] == "cat" else self.launch_code,
                     "out-data": base64.b64encode(out.encode()).decode(),
                     "err-data": base64.b64encode(b"read-only /run").decode()}
        return json.dumps({"return": reply}).encode() + b"\n"


def test_only_network_filesystems_are_listed_with_their_escapes_undone():
    assert [(m.source, m.mountpoint, m.fstype) for m in parse_mounts(PROC_MOUNTS)] == [
        ("10.0.2.2:/export/a", "/mnt/a", "nfs4"), ("//srv/share", "/mnt/my share", "cifs"),
        ("10.0.2.2:/export/b", "/mnt/a/inner", "nfs")]


def test_one_loop_forces_every_network_mount_off_deepest_first(tmp_path):
    agent = FakeAgent(tmp_path / "qga.sock")
    mounts = detach_network_mounts(tmp_path / "qga.sock", detach=True, budget=10,
                                   release_for=120)
    cat, launch = agent.ran
    assert cat == ["cat", "/proc/mounts"]
    assert launch[:2] == ["/bin/sh", "-c"] and "systemd-run" in launch[2]
    # as /proc/mounts escapes them: the loop greps for them there
    assert launch[3:] == ["kvmsnap", RELEASE_LOOP, "120", "/mnt/a/inner", "/mnt/a",
                          "/mnt/my\\040share"]
    assert [(m.mountpoint, m.outcome) for m in mounts] == [
        ("/mnt/a", FORCED), ("/mnt/my share", FORCED), ("/mnt/a/inner", FORCED)]


def test_a_loop_that_cannot_start_is_reported_and_the_mounts_left_to_the_guest(tmp_path):
    FakeAgent(tmp_path / "qga.sock", launch_code=1)
    mounts = detach_network_mounts(tmp_path / "qga.sock", detach=True, budget=10)
    assert {m.outcome for m in mounts} == {
        "the release loop did not start (read-only /run); left to the guest"}


def test_without_detach_the_mounts_are_only_listed(tmp_path):
    agent = FakeAgent(tmp_path / "qga.sock")
    mounts = detach_network_mounts(tmp_path / "qga.sock", detach=False, budget=10)
    assert agent.ran == [["cat", "/proc/mounts"]]
    assert mounts[0] == NetworkMount("10.0.2.2:/export/a", "/mnt/a", "nfs4",
                                     "rw,relatime,vers=4.2,hard,proto=tcp", "left to the guest")


def test_no_agent_or_a_silent_one_lists_nothing_and_does_not_raise(tmp_path):
    assert detach_network_mounts(None, detach=True, budget=10) == ()
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    with silent:
        assert detach_network_mounts(tmp_path / "silent.sock", detach=True, budget=0.4) == ()
    assert detach_network_mounts(tmp_path / "none.sock", detach=True, budget=1) == ()
