"""A restored libvirt VM: its recorded definition rewritten for the restored disks
(``domain.xml`` in the restore directory, which ``virsh define`` accepts), and, on request,
defined (``--define``) and started (``--start``) under its new name.

The copy must be able to run beside the original: a new name (default ``<vm>-restored``)
and UUID, new MAC addresses, its NICs' links down unless ``--plug-nics`` (a restored web
server must not answer for the live one), file consoles into the restore directory. A
domain that already has the name is refused; with ``--force``, one that is shut off gets
the new definition under its own UUID (``virsh define`` replaces it), a running one never.
"""

from __future__ import annotations

import uuid as uuids
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends.libvirt import connect, find_domain
from kvmsnap_plugin.backends.libvirt_monitor import libvirt_module
from kvmsnap_plugin.backends.libvirt_xml import RestoredDomain, restored_xml
from kvmsnap_plugin.errors import UsageError, VMError
from kvmsnap_plugin.host import dirs

DOMAIN_FILE = "domain.xml"


@dataclass(frozen=True)
class DomainPlan:
    """Where the restored domain goes, checked before any byte is restored."""

    name: str
    uuid: str
    uri: str | None  # None: only write domain.xml, define nothing


def plan_domain(record_vm: str, domain_xml: str, name: str | None, define: bool,
                uri: str, force: bool) -> DomainPlan | None:
    """The restored domain's name and UUID; refuses a name in use (see the module)."""
    if not domain_xml:
        if define:
            raise UsageError(f"the backup of {record_vm} holds no libvirt domain XML: it was "
                             "a bare QEMU VM (or backed up by an older kvmsnap)",
                             "drop --define/--start and boot it from HOW-TO-BOOT.txt")
        return None
    name = name or f"{record_vm}-restored"
    new_uuid = str(uuids.uuid4())
    if not define:
        return DomainPlan(name, new_uuid, None)
    conn = connect(uri)
    try:
        existing = find_domain(conn, name)
        if existing is not None:
            new_uuid = _replaceable(existing, name, force)
    finally:
        conn.close()
    return DomainPlan(name, new_uuid, uri)


def _replaceable(existing: Any, name: str, force: bool) -> str:
    if existing.isActive():
        raise UsageError(f"libvirt domain {name} exists and is running: restoring over a "
                         "running VM is refused", f"pick another --name, or shut {name} "
                         "off first (then --force replaces its definition and disks)")
    if not force:
        raise UsageError(f"libvirt domain {name} exists (shut off)",
                         "pick another --name, or pass --force to replace its definition")
    return existing.UUIDString()


def write_domain(plan: DomainPlan, domain_xml: str, disks: dict[str, tuple[str, str]],
                 nvram: str | None, plug_nics: bool, target: Path) -> tuple[Path, list[str]]:
    """``target/domain.xml``; the targets of writable disks left out (not restored)."""
    xml, dropped = restored_xml(domain_xml, RestoredDomain(
        plan.name, plan.uuid, disks, nvram, plug_nics, str(target)))
    path = target / DOMAIN_FILE
    dirs.replace_file(path, xml.encode())
    return path, dropped


def define(plan: DomainPlan, xml_file: Path, start: bool) -> None:
    """Define the restored domain in libvirt, and boot it if ``start``."""
    assert plan.uri is not None
    libvirt = libvirt_module()
    conn = connect(plan.uri)
    try:
        dom = conn.defineXML(xml_file.read_text())
        if start:
            dom.create()
    except libvirt.libvirtError as exc:
        raise VMError(f"libvirt refused the restored domain {plan.name}: {exc}",
                      f"fix {xml_file} and run `virsh define {xml_file}`") from None
    finally:
        conn.close()
