"""A private libvirtd and demo-guest domains for the libvirt backend's tests.

Each test session runs libvirtd and virtlogd of its own, in a private mount namespace whose
/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are
directories of the session: sessions running side by side (and the host's own libvirtd)
never see each other's domains, and no session stops a daemon another one uses. Clients
reach it through ``qemu:///system?socket=...``. The daemons are the installed ones
(``make`` installs libvirt; nothing is installed here) and are stopped, by PID, at the end.
Set KVMSNAP_LIBVIRT_URI to test against a libvirt you run yourself instead. Tests that need
libvirt fail, never skip, without it. Each domain is destroyed and undefined when its test
ends, whatever happened.

Domains run the busybox demo guest under TCG (``type='qemu'``), kernel and initramfs booted
directly, a qcow2 data disk, the serial console into a file (the workload's counter is read
there) and a user-mode NIC. Their QEMU runs as root: the demo kernel lives under root's
cache directory and pytest's temp dirs are 0700, and root is what QEMU 7.2 needs for
userfaultfd write-protect (background-snapshot). The private qemu.conf says so, and the
domains carry a static DAC label for a libvirt given by KVMSNAP_LIBVIRT_URI.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmsnap_demo.builder import DemoGuest, make_data_disk
from kvmsnap_plugin.backends.libvirt import connect
from kvmsnap_plugin.host import process

#: libvirt's directories, each replaced by one of the session's in the daemons' namespace
PRIVATE_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
_names = itertools.count()


def answers(path: Path) -> bool:
    """Is a daemon listening on this unix socket?"""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


@dataclass
class PrivateLibvirt:
    """libvirtd + virtlogd in a mount namespace of their own, rooted in ``root``."""

    root: Path
    procs: list[subprocess.Popen]

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    @classmethod
    def start(cls, root: Path) -> PrivateLibvirt:
        _prepare(root)
        daemons = cls(root, [])
        try:
            daemons._spawn(_in_private_namespace(root, [
                process.find_program("libvirtd", "libvirt-daemon-system"),
                "--pid-file", str(root / "libvirtd.pid")]), "libvirtd")
            daemons._wait_for(root / "run" / "libvirt-sock", "libvirtd")
            # virtlogd joins libvirtd's namespace: its socket is in the private /run/libvirt
            daemons._spawn(["nsenter", "--target", str(daemons.procs[0].pid), "--mount", "--",
                            process.find_program("virtlogd", "libvirt-daemon-system"),
                            "--pid-file", str(root / "virtlogd.pid")], "virtlogd")
            daemons._wait_for(root / "run" / "virtlogd-sock", "virtlogd")
        except BaseException:
            daemons.stop()
            raise
        return daemons

    def _spawn(self, argv: list[str], name: str) -> None:
        with open(self.root / f"{name}.log", "wb") as log:
            self.procs.append(process.spawn(argv, stderr=log))

    def _wait_for(self, sock: Path, name: str) -> None:
        deadline = time.monotonic() + 30
        while not answers(sock):
            proc = self.procs[-1]
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / f"{name}.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"{name} did not start (exit {proc.poll()}): {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            process.stop(proc, grace=15)


def _prepare(root: Path) -> None:
    """The private directories; /etc/libvirt is a copy whose qemu.conf runs QEMU as root.

    Besides the reason in the module docstring: on this kind of host /dev/kvm is root's
    alone while nested KVM is broken, and libvirt 9.0 probes QEMU as root (KVM found) but
    checks /dev/kvm as its QEMU user (not usable); the two disagree, and it re-probes QEMU
    (~4 s) on every lookup of its capabilities, ~48 s per domain defined. As root they agree.
    """
    for name, path in PRIVATE_DIRS.items():
        if name == "etc":
            shutil.copytree(path, root / name, ignore=shutil.ignore_patterns("*.xml"),
                            symlinks=True)
        else:
            (root / name).mkdir(mode=0o755)
    conf = root / "etc" / "qemu.conf"
    conf.write_text(conf.read_text() + '\nuser = "root"\ngroup = "root"\n')


def _in_private_namespace(root: Path, argv: list[str]) -> list[str]:
    binds = " && ".join(f'mkdir -p {target} && mount --bind "$1/{name}" {target}'
                        for name, target in PRIVATE_DIRS.items())
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{binds} && shift && exec "$@"', "private-libvirt", str(root), *argv]


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A libvirt of this session's own (or KVMSNAP_LIBVIRT_URI's); yields its URI."""
    import libvirt  # noqa: F401  # fail here, clearly, if libvirt-python is missing

    given = os.environ.get("KVMSNAP_LIBVIRT_URI")
    if given:
        connect(given).close()
        yield given
        return
    daemons = PrivateLibvirt.start(tmp_path_factory.mktemp("libvirt"))
    try:
        connect(daemons.uri).close()
        yield daemons.uri
    finally:
        daemons.stop()


@dataclass
class Domain:
    """A demo-guest domain and what its tests read."""

    name: str
    uri: str
    dom: Any
    disks: tuple[Path, ...]
    console: Path

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def counter(self) -> int:
        counts = re.findall(r"KVMSNAP-COUNT (\d+)", self.console_text())
        return int(counts[-1]) if counts else 0

    def wait_console(self, pattern: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.console_text()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} on the console within "
                                   f"{timeout:g} s:\n{self.console_text()[-1000:]}")
            time.sleep(0.1)

    def wait_counter(self, at_least: int, timeout: float = 60.0) -> int:
        self.wait_console(rf"KVMSNAP-COUNT {at_least}\b", timeout)
        return self.counter()

    def virsh(self, *args: str) -> str:
        return process.run(["virsh", "-c", self.uri, *args], timeout=120).stdout

    def blklist(self, *flags: str) -> list[tuple[str, str]]:
        """``virsh domblklist``: (target, source) as libvirt sees them."""
        lines = self.virsh("domblklist", *flags, self.name).splitlines()[2:]
        return [tuple(line.split(None, 1)) for line in lines if line.strip()]  # type: ignore[misc]

    def inactive_sources(self) -> list[str]:
        xml = self.virsh("dumpxml", "--inactive", self.name)
        return [s.get("file", "") for s in ET.fromstring(xml).findall("./devices/disk/source")]

    def state(self) -> str:
        return self.virsh("domstate", self.name).strip()

    def shut_down(self, timeout: float = 60.0) -> None:
        """Press the power button and wait until libvirt sees the domain shut off."""
        self.dom.shutdown()
        deadline = time.monotonic() + timeout
        while self.dom.isActive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not shut down within {timeout:g} s")
            time.sleep(0.1)


def domain_xml(name: str, guest: DemoGuest, disks: tuple[Path, ...], console: Path,
               power_button: str = "handle") -> str:
    append = (f"console=ttyS0 quiet panic=-1 kvmsnap.disks={len(disks)} "
              f"kvmsnap.power={power_button} kvmsnap.interval=0.1 kvmsnap.fill=0 "
              "kvmsnap.ticker=0")
    disk_xml = "".join(
        f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='{path}'/><target dev='vd{chr(ord("a") + i)}' bus='virtio'/></disk>"""
        for i, path in enumerate(disks))
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initrd}</initrd>
    <cmdline>{append}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{process.find_program("qemu-system-x86_64", "qemu-system-x86")}</emulator>
    {disk_xml}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <interface type='user'><model type='virtio'/></interface>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


def _remove(conn: Any, name: str) -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        dom = conn.lookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()


@pytest.fixture
def start_domain(libvirtd: str, demo_guest: DemoGuest,
                 tmp_path: Path) -> Iterator[Callable[..., Domain]]:
    """Factory: ``start_domain(disks=1, running=True)`` -> a defined (and booted) Domain."""
    conn = connect(libvirtd)
    names: list[str] = []

    def start(disks: int = 1, running: bool = True, power_button: str = "handle") -> Domain:
        name = f"kvmsnap-test-{os.getpid()}-{next(_names)}"
        workdir = tmp_path / name
        workdir.mkdir()
        images = tuple(make_data_disk(workdir / f"data{i}.qcow2", 64, f"data{i}")
                       for i in range(disks))
        console = workdir / "console.log"
        names.append(name)
        dom = conn.defineXML(domain_xml(name, demo_guest, images, console, power_button))
        domain = Domain(name, libvirtd, dom, images, console)
        if running:
            dom.create()
            domain.wait_console("KVMSNAP-READY", 60)
        return domain

    try:
        yield start
    finally:
        for name in names:
            _remove(conn, name)
        conn.close()
