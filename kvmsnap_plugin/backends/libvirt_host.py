"""What a libvirt domain is on this host: its QEMU process and its image files."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends.libvirt_monitor import libvirt_module
from kvmsnap_plugin.backends.libvirt_xml import DomainDisk
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import ParentDisk
from kvmsnap_plugin.vm.parent import is_block_device


def find_qemu_pid(name: str, uuid: str) -> int:
    """The domain's QEMU process: libvirt's pid file, checked against the UUID on its
    command line; else a search of /proc (never a clone of it: those have -incoming)."""
    candidates = [Path("/run/libvirt/qemu") / f"{name}.pid"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        candidates.append(Path(runtime) / "libvirt/qemu/run" / f"{name}.pid")
    for pidfile in candidates:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _is_domain_qemu(pid, uuid):
                return pid
    found = [int(p.name) for p in Path("/proc").iterdir()
             if p.name.isdigit() and _is_domain_qemu(int(p.name), uuid)]
    if len(found) != 1:
        raise VMError(f"cannot find the QEMU process of domain {name} "
                      f"({len(found)} candidates)", "run kvmsnap as root on the VM's host")
    return found[0]


def _is_domain_qemu(pid: int, uuid: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in argv]
    return ("-uuid" in words and uuid in words and "-incoming" not in words
            and "qemu" in Path(words[0]).name)


def offline_disk(disk: DomainDisk) -> ParentDisk:
    """A disk of a shut-off domain, described from its image file."""
    source = disk.source or ""
    info: list[dict[str, Any]] = []
    if disk.kind == "file" and Path(source).is_file():
        # The format libvirt opens it as (raw unless told: libvirt never probes), never
        # one guessed from what the guest wrote into it.
        info = json.loads(process.run(["qemu-img", "info", "-f", disk.format or "raw",
                                       "--backing-chain", "--output=json", source],
                                      timeout=60).stdout)
    top = info[0] if info else {}
    return ParentDisk(device=disk.target, node="", filename=source,
                      format=disk.format or top.get("format", "raw"),
                      virtual_size=int(top.get("virtual-size", 0)),
                      read_only=disk.read_only,
                      chain=tuple(i.get("filename", "") for i in info),
                      host_device=disk.kind == "block" and is_block_device(source))



def running_domain_names(conn: Any) -> list[str]:
    """The names of the domains running (or paused) on the connection, sorted."""
    libvirt = libvirt_module()
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    except libvirt.libvirtError as exc:
        raise VMError(f"cannot list libvirt's domains: {exc}",
                      "run kvmsnap as root, or pass the right --libvirt-uri") from None
    return sorted(dom.name() for dom in domains)
