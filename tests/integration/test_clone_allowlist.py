"""The clone's allow-list against a real QEMU: a parent with hostile but legal options is
backed up while, seen from outside, no other process touches its sockets and files; what
kvmsnap cannot judge is refused before the pause, or left out when the operator says so."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, kvmsnap

from kvmsnap_plugin.model import BackupJob, ForkOptions
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup
from kvmsnap_plugin.vm import qemu_help

pytestmark = pytest.mark.qemu

QEMU = "/usr/bin/qemu-system-x86_64"
MARKER = b"kvmsnap-marker " * 4096  # what a truncating clone would take away


def unix_sockets(paths: set[str]) -> dict[str, set[str]]:
    """The inodes of the unix sockets bound to ``paths`` (from /proc/net/unix)."""
    found: dict[str, set[str]] = {path: set() for path in paths}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) > 7 and parts[7] in found:
            found[parts[7]].add(parts[6])
    return found


class Watch:
    """Polls every process but the parent for the parent's files and sockets."""

    def __init__(self, parent: int, files: list[Path], sockets: list[Path],
                 workdir: Path) -> None:
        self.parent, self.files, self.workdir = parent, {str(f) for f in files}, str(workdir)
        self.listening = unix_sockets({str(s) for s in sockets})
        self.held = {f"socket:[{i}]" for inodes in self.listening.values() for i in inodes}
        self.smallest = {str(f): f.stat().st_size for f in files}
        self.foreign: list[str] = []
        self.clone_argv: list[str] = []
        self.rounds = 0
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join(10)

    def _poll(self) -> None:
        while self.running:
            self._once()
            self.rounds += 1
            time.sleep(0.01)

    def _once(self) -> None:
        for path, inodes in unix_sockets(set(self.listening)).items():
            if inodes - self.listening[path]:
                self.foreign.append(f"{path} bound again: {inodes}")
        for path in self.smallest:
            self.smallest[path] = min(self.smallest[path], os.stat(path).st_size)
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            if fd_dir.parent.name == str(self.parent):
                continue
            self._check_process(fd_dir)

    def _check_process(self, fd_dir: Path) -> None:
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:  # gone, or a kernel thread
            return
        for link in links:
            if link in self.files or link in self.held:
                self.foreign.append(f"process {fd_dir.parent.name} has {link} open")
        if not self.clone_argv:
            with open(fd_dir.parent / "cmdline", "rb") as cmdline:
                argv = cmdline.read().decode(errors="replace").split("\0")
            if "-incoming" in argv and self.workdir in " ".join(argv):  # our clone
                self.clone_argv = argv


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        return True


def test_hostile_options_of_the_parent_stay_the_parents(start_demo, tmp_path):
    debugcon, gdb = tmp_path / "debugcon.sock", tmp_path / "gdb.sock"
    dump, trace, log, wav = (tmp_path / n for n in ("net.pcap", "trace.out", "qemu.log",
                                                    "sound.wav"))
    (tmp_path / "events").write_text("qemu_system_*\n")
    vm = start_demo(extra_args=(
        "-debugcon", f"unix:{debugcon},server=on,wait=off",
        "-gdb", f"unix:{gdb},server=on,wait=off",
        "-object", f"filter-dump,id=dump0,netdev=net0,file={dump}",
        "-trace", f"events={tmp_path / 'events'},file={trace}",
        "-D", str(log), "-d", "guest_errors",
        "-audio", f"driver=wav,model=hda,path={wav}"))
    files = [dump, trace, log, wav]
    for path in files:  # a clone that truncated one would take these away
        with open(path, "ab") as f:
            f.write(MARKER)
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(workdir=tmp_path / "work"))
    with Watch(vm.pid, files, [debugcon, gdb], tmp_path / "work") as watch:
        report = backup(job, Hooks(plugin_manager([], entry_points=False)))
    assert report.clean
    assert watch.clone_argv, f"the clone was never seen running ({watch.rounds} rounds)"
    shown = " ".join(watch.clone_argv)
    for path in [*files, debugcon, gdb, tmp_path / "events"]:
        assert str(path) not in shown
    assert watch.foreign == []
    for path in files:
        assert watch.smallest[str(path)] >= len(MARKER), path  # never truncated
    assert connects(debugcon)
    vm.qmp.events()
    assert connects(gdb)  # last: a gdb connection stops the guest
    vm.qmp.wait_event("STOP", 30)  # it reached the parent's own gdbstub
    vm.qmp.execute("cont")  # a paused guest would sit out the power button's 20 s at the end


def test_what_kvmsnap_cannot_judge_is_refused_before_the_pause_or_dropped_on_request(
        start_demo, tmp_path):
    barrier = socket.create_server(("127.0.0.1", 0))  # where input-barrier connects
    barrier.settimeout(0.2)
    vm = start_demo(extra_args=(
        "-set", "device.nic0.mac=52:54:00:12:34:99",
        "-object", f"input-barrier,id=barrier0,name=demo,server=127.0.0.1,"
                   f"port={barrier.getsockname()[1]}"))
    barrier.accept()[0].close()  # the parent's own connection
    fork = ("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir", str(tmp_path / "work"))
    vm.qmp.events()
    assert_one_line_error(kvmsnap(*fork), "-set, whose effect kvmsnap cannot see",
                          "(-set device.nic0.mac=", "--clone-drop set")
    assert_one_line_error(kvmsnap(*fork, "--clone-drop", "set"),
                          "an object of type input-barrier", "--clone-drop object:input-barrier")
    assert "STOP" not in [e.name for e in vm.qmp.events()]  # never paused
    done = kvmsnap(*fork, "--clone-drop", "set", "--clone-drop", "object:input-barrier")
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.raises(TimeoutError):
        barrier.accept()  # the clone did not connect where the parent did
    barrier.close()
    # The allow-list read the parent's own binary, which is the one on disk here.
    assert qemu_help.parent_options(vm.pid) == qemu_help.binary_options(QEMU)


def test_the_binarys_help_says_which_options_take_a_value():
    known = qemu_help.binary_options(QEMU)
    assert known is not None
    assert {"S", "snapshot", "no-reboot", "nodefaults", "enable-kvm", "h", "help"} <= known.flags
    assert {"m", "machine", "M", "drive", "device", "name", "watchdog-action"} <= \
        known.with_value
    assert not known.flags & known.with_value
    assert not known.knows("virtioconsole")  # gone from QEMU 7.2
