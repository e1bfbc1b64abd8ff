"""Launch demo guests: the command line and a context manager that always cleans up."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvmsnap_demo.builder import DemoGuest, make_data_disk
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.images import raw_copy
from kvmsnap_plugin.host.probes import QEMU
from kvmsnap_plugin.paths import socket_dir
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.qemu_args import escape

READY = r"KVMSNAP-READY"
UNMOUNTED = r"KVMSNAP-UNMOUNTED"


@dataclass(frozen=True)
class DemoOptions:
    """Variants of the demo guest; all are launch options, no rebuild needed."""

    memory_mib: int = 256
    disks: int = 1
    disk_size_mib: int = 64
    power_button: Literal["handle", "ignore"] = "handle"
    interval: float = 0.1
    nic: bool = True
    fill_mib: int = 0  # random data held in a guest tmpfs, so its RAM is really in use
    ticker: bool = False  # "T" every 10 ms on ttyS1 (give it a second -serial in extra_args)
    callhome: int = 0  # a host TCP port the guest tries to reach on the power button
    writer: bool = False  # write on request from ttyS2 (give it a third -serial)
    agent: bool = False  # a minimal guest agent (guest-shutdown) on virtio-serial
    #: "blockdev" (modern, like libvirt) or "drive" (legacy) disk options; per disk
    disk_syntax: tuple[str, ...] = ("blockdev", "drive")
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    binary: str | None = None  # the QEMU to run (default: qemu-system-x86_64 on PATH)
    #: each line's number also on the disk (/instant) and a stream of records (/stream), both
    #: O_DIRECT; the stream preallocates 80 MiB: give it disk_size_mib=128
    instant: bool = False
    #: boot through OVMF with a writable VARS flash given as "drive" (-drive if=pflash) or
    #: "blockdev" (-blockdev + -machine pflash1=NODE, as libvirt does); "" for no firmware
    uefi: Literal["", "drive", "blockdev"] = ""
    #: the VARS file to boot with (a restored one, say); default: a fresh copy of OVMF's
    uefi_vars: Path | None = None


#: Debian's ovmf: the 4 MiB build without Secure Boot (no SMM needed, so `-machine pc` works)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@dataclass(frozen=True)
class DemoPaths:
    workdir: Path
    disks: tuple[Path, ...]
    qmp: Path  # the launcher's own QMP socket
    backup_qmp: Path  # a second one, for kvmsnap (a QMP socket serves one client at a time)
    console: Path
    uefi_vars: Path | None = None  # the guest's writable VARS flash (DemoOptions.uefi)


def uefi_argv(syntax: str, vars_file: Path) -> list[str]:
    """OVMF's read-only code and a writable VARS store; OVMF boots the demo's -kernel and
    -initrd through fw_cfg, so the guest is the same, only the firmware changes."""
    if syntax == "drive":
        return ["-drive", f"if=pflash,unit=0,readonly=on,format=raw,file={escape(OVMF_CODE)}",
                "-drive", f"if=pflash,unit=1,format=raw,file={escape(vars_file)}"]
    return ["-blockdev", f"driver=file,filename={escape(OVMF_CODE)},node-name=uefi-code-file,"
                         "read-only=on",
            "-blockdev", "driver=raw,file=uefi-code-file,node-name=uefi-code,read-only=on",
            "-blockdev", f"driver=file,filename={escape(vars_file)},node-name=uefi-vars-file",
            "-blockdev", "driver=raw,file=uefi-vars-file,node-name=uefi-vars",
            "-machine", "pflash0=uefi-code,pflash1=uefi-vars"]


def demo_argv(guest: DemoGuest, accel: str, paths: DemoPaths, opts: DemoOptions) -> list[str]:
    append = (f"console=ttyS0 quiet panic=-1 kvmsnap.disks={len(paths.disks)} "
              f"kvmsnap.power={opts.power_button} kvmsnap.interval={opts.interval} "
              f"kvmsnap.fill={opts.fill_mib} kvmsnap.ticker={int(opts.ticker)} "
              f"kvmsnap.callhome={opts.callhome} kvmsnap.writer={int(opts.writer)} "
              f"kvmsnap.agent={int(opts.agent)} kvmsnap.instant={int(opts.instant)}")
    argv = [
        opts.binary or process.find_program(QEMU, "qemu-system-x86"),
        "-name", "kvmsnap-demo",
        "-machine", f"pc,accel={accel}",
        "-m", str(opts.memory_mib), "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", append,
        "-chardev", f"file,id=console0,path={escape(paths.console)}",
        "-serial", "chardev:console0",
        "-qmp", f"unix:{escape(paths.qmp)},server=on,wait=off",
        "-qmp", f"unix:{escape(paths.backup_qmp)},server=on,wait=off",
    ]
    for index, disk in enumerate(paths.disks):
        syntax = opts.disk_syntax[index % len(opts.disk_syntax)]
        if syntax == "blockdev":
            argv += ["-blockdev", f"driver=file,filename={escape(disk)},"
                                  f"node-name=disk{index}-file",
                     "-blockdev", f"driver=qcow2,file=disk{index}-file,node-name=disk{index}"]
        else:
            argv += ["-drive", f"file={escape(disk)},format=qcow2,if=none,id=disk{index}"]
        argv += ["-device", f"virtio-blk-pci,drive=disk{index},id=vdisk{index}"]
    if opts.agent:
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=qga0,path={escape(paths.qmp.with_name('qga.sock'))},"
                             "server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=qga0,"
                            "name=org.qemu.guest_agent.0"]
    if opts.nic:
        # A guest that calls home needs a parent that may (restrict=off) to show the clone
        # may not.
        restrict = "off" if opts.callhome else "on"
        argv += ["-netdev", f"user,id=net0,restrict={restrict}",
                 "-device", "virtio-net-pci,netdev=net0,id=nic0"]
    if opts.uefi and paths.uefi_vars:
        argv += uefi_argv(opts.uefi, paths.uefi_vars)
    return argv + list(opts.extra_args)


class WorkloadVM(Machine):
    """A running test guest whose workload echoes ``KVMSNAP-COUNT N`` on its console."""

    #: how long :meth:`wait_counter` waits by default
    counter_timeout = 30.0

    def __init__(self, argv: list[str], paths: DemoPaths, name: str) -> None:
        super().__init__(argv, qmp_path=paths.qmp, name=name, console_log=paths.console)
        self.paths = paths

    def counter(self) -> int:
        """The workload's latest line number, as echoed on the console."""
        counts = re.findall(r"KVMSNAP-COUNT (\d+)", self.console())
        return int(counts[-1]) if counts else 0

    def wait_counter(self, at_least: int, timeout: float | None = None) -> int:
        self.wait_console(rf"KVMSNAP-COUNT {at_least}\b", timeout or self.counter_timeout)
        return self.counter()

    def crash_copy(self, index: int, dest: Path) -> Path:
        """A raw copy of disk ``index`` as a power cut would leave it.

        The guest is paused for the copy; ``stop`` makes QEMU flush its own caches, so the
        file holds exactly what the guest had written to its disk, and no more.
        """
        self.qmp.execute("stop")
        try:
            return raw_copy(self.paths.disks[index], dest, "qcow2")
        finally:
            self.qmp.execute("cont")


class DemoVM(WorkloadVM):
    """A running demo guest, with helpers to read its workload."""

    def __init__(self, argv: list[str], paths: DemoPaths, opts: DemoOptions) -> None:
        super().__init__(argv, paths, "demo")
        self.opts = opts

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_console(READY, timeout)

    def shutdown(self, powerdown_timeout: float = 20.0, quit_timeout: float = 5.0) -> str:
        if self.opts.power_button == "ignore":
            powerdown_timeout = 0  # it would wait in vain: go straight to `quit`
        return super().shutdown(powerdown_timeout, quit_timeout)

    def power_off_cleanly(self, timeout: float = 30.0) -> None:
        """Press the power button and wait until the guest has unmounted and QEMU exited."""
        self.qmp.execute("system_powerdown")
        self.wait_console(UNMOUNTED, timeout)
        if not self.wait_exit(timeout):
            raise TimeoutError("the demo guest unmounted but QEMU did not exit")
        self.ended_by = "guest"
        self.shutdown()


def _uefi_vars(opts: DemoOptions, base: Path) -> Path | None:
    if not opts.uefi:
        return None
    if opts.uefi_vars:
        return opts.uefi_vars
    if not OVMF_CODE.exists():
        raise FileNotFoundError(f"{OVMF_CODE} is missing: apt-get install ovmf")
    vars_file = base / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_file)
    return vars_file


@contextlib.contextmanager
def demo_vm(guest: DemoGuest, accel: str, opts: DemoOptions = DemoOptions(),
            workdir: Path | None = None,
            disks: Sequence[Path] | None = None) -> Iterator[DemoVM]:
    """Start a demo guest on fresh data disks; always stop it and remove its files.

    With ``workdir`` the disks are kept there (the caller owns that directory). ``disks``
    boots existing images instead (e.g. ones ``kvmsnap restore`` made).
    """
    own_dir = workdir is None
    base = Path(tempfile.mkdtemp(prefix="kvmsnap-demo-")) if own_dir else workdir
    try:
        disks = tuple(disks) if disks is not None else tuple(
            make_data_disk(base / f"data{i}.qcow2", opts.disk_size_mib, f"data{i}")
            for i in range(opts.disks))
        opts = dataclasses.replace(opts, disks=len(disks))
        with socket_dir() as sockets:
            paths = DemoPaths(base, disks, sockets / "qmp.sock", sockets / "backup-qmp.sock",
                              base / "console.log", _uefi_vars(opts, base))
            vm = DemoVM(demo_argv(guest, accel, paths, opts), paths, opts)
            with vm:
                yield vm
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
