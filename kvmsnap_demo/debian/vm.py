"""Launch the Debian test guest on a throw-away overlay, and follow it on its console."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvmsnap_demo.debian.recipe import DebianGuest
from kvmsnap_demo.vm import DemoPaths, WorkloadVM
from kvmsnap_plugin.errors import HostError, ProcessError, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.probes import QEMU
from kvmsnap_plugin.paths import socket_dir

READY = r"KVMSNAP-READY"
BUTTON_WATCHED = r"systemd-logind\[\d+\]: Watching system buttons on \S+ \(Power Button\)"
STOPPED = r"KVMSNAP-WORKLOAD-STOPPED (\d+)"
POWERED_DOWN = r"reboot: Power down"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def debian_argv(guest: DebianGuest, accel: str, paths: DemoPaths, *, memory_mib: int = 1024,
                smp: int = 1, nic: bool = True, extra_args: Sequence[str] = (),
                agent: bool = False) -> list[str]:
    """The QEMU command line, shaped like the demo guest's (and libvirt's) for kvmsnap.
    ``agent``: the guest agent's channel (qemu-guest-agent is installed in the guest)."""
    argv = [
        process.find_program(QEMU, "qemu-system-x86"),
        "-name", "kvmsnap-debian",
        "-machine", f"pc,accel={accel}",
        "-m", str(memory_mib), "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append,
        "-chardev", f"file,id=console0,path={paths.console}", "-serial", "chardev:console0",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.backup_qmp},server=on,wait=off",
    ]
    for index, disk in enumerate(paths.disks):
        argv += ["-blockdev", f"driver=file,filename={disk},node-name=disk{index}-file",
                 "-blockdev", f"driver=qcow2,file=disk{index}-file,node-name=disk{index}",
                 "-device", f"virtio-blk-pci,drive=disk{index},id=vdisk{index}"]
    if nic:
        argv += ["-netdev", "user,id=net0,restrict=on",
                 "-device", "virtio-net-pci,netdev=net0,id=nic0"]
    if agent:
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=qga0,path={paths.qmp.with_name('qga.sock')},"
                             "server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=qga0,"
                            "name=org.qemu.guest_agent.0"]
    return argv + list(extra_args)


class DebianVM(WorkloadVM):
    """A running Debian guest, with helpers to follow its workload and shut it down."""

    counter_timeout = 60.0

    def __init__(self, argv: list[str], paths: DemoPaths, guest: DebianGuest) -> None:
        super().__init__(argv, paths, "debian")
        self.guest = guest

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait for the workload, and for logind to watch the power button.

        systemd under TCG boots in about 20 s; a button press before logind watches the
        button would be lost silently.
        """
        started = time.monotonic()
        self.wait_console(READY, timeout)
        self.wait_console(BUTTON_WATCHED, max(5.0, timeout - (time.monotonic() - started)))

    def plain_console(self) -> str:
        """The console log without systemd's colour escapes, for matching status lines."""
        return ANSI_ESCAPE.sub("", self.console())

    def stopped_at(self) -> int | None:
        """The last line the workload wrote before systemd stopped it (None: not stopped)."""
        match = re.search(STOPPED, self.console())
        return int(match.group(1)) if match else None

    def power_off_cleanly(self, timeout: float = 120.0) -> float:
        """Press the power button; wait for QEMU to exit after a full poweroff. Seconds taken."""
        started = time.monotonic()
        self.qmp.execute("system_powerdown")
        if not self.wait_exit(timeout):
            raise VMError(f"the Debian guest did not power off within {timeout:g} s",
                          f"see the guest console: {self.paths.console}")
        taken = time.monotonic() - started
        self.ended_by = "guest"
        self.shutdown()
        if not re.search(POWERED_DOWN, self.console()):
            raise VMError("QEMU exited without the guest powering off",
                          f"see the guest console: {self.paths.console}")
        return taken

    def shutdown(self, powerdown_timeout: float = 90.0, quit_timeout: float = 5.0) -> str:
        """Like Machine.shutdown, with room for systemd to stop everything under TCG."""
        return super().shutdown(powerdown_timeout, quit_timeout)


@contextlib.contextmanager
def debian_vm(guest: DebianGuest, accel: str, workdir: Path, memory_mib: int = 1024, *,
              smp: int = 1, nic: bool = True, extra_args: Sequence[str] = (),
              disk: Path | None = None,
              extra_disks: Sequence[Path] = (), agent: bool = False) -> Iterator[DebianVM]:
    """Start the guest on a fresh qcow2 overlay in ``workdir``; always stop QEMU after.

    The overlay and the console log stay in ``workdir`` (the caller's) for inspection.
    ``disk`` boots an existing disk image instead (e.g. one ``kvmsnap restore`` made);
    ``extra_disks`` (qcow2) follow it as vdb, vdc...
    """
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = disk or make_overlay(guest.base_image, workdir / "disk0.qcow2")
    with socket_dir() as sockets:
        paths = DemoPaths(workdir, (overlay, *extra_disks), sockets / "qmp.sock",
                          sockets / "backup-qmp.sock", workdir / "console.log")
        argv = debian_argv(guest, accel, paths, memory_mib=memory_mib, smp=smp, nic=nic,
                           extra_args=extra_args, agent=agent)
        with DebianVM(argv, paths, guest) as vm:
            yield vm


def make_overlay(base: Path, overlay: Path) -> Path:
    """A qcow2 overlay, so the shared base image is never written."""
    try:
        process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                     overlay], timeout=60)
    except ProcessError as exc:
        raise HostError(f"cannot create an overlay on {base}: {exc}",
                        "rebuild the guest: remove its ~/.cache/kvmsnap/debian-* dir") from exc
    return overlay
