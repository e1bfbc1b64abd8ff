"""A libvirt domain's XML, read and written: pure functions, no libvirt needed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmsnap_plugin.model import ForkedDisk, ParentDisk


@dataclass(frozen=True)
class DomainDisk:
    """A ``<disk>`` of the domain's XML: what libvirt calls it and where it points."""

    target: str  # vda
    alias: str | None  # virtio-disk0 (live XML only): QEMU's qdev id
    source: str | None  # the top image, for file disks
    kind: str  # file, block, network, volume
    format: str | None
    read_only: bool
    backing: str | None  # the image below the top, as libvirt knows it


def domain_disks(xml: str) -> list[DomainDisk]:
    """The ``<disk>`` elements of a domain's XML, in order."""
    disks = []
    for node in ET.fromstring(xml).findall("./devices/disk"):
        target = node.find("target")
        alias = node.find("alias")
        driver = node.find("driver")
        disks.append(DomainDisk(
            target=target.get("dev", "") if target is not None else "",
            alias=alias.get("name") if alias is not None else None,
            source=_source_path(node.find("source")),
            kind=node.get("type", "file"),
            format=driver.get("type") if driver is not None else None,
            read_only=node.find("readonly") is not None or node.get("device") == "cdrom",
            backing=_source_path(node.find("backingStore/source"))))
    return disks


def _source_path(source: ET.Element | None) -> str | None:
    if source is None:
        return None
    return source.get("file") or source.get("dev")


def disk_by_target(xml: str, target: str) -> DomainDisk | None:
    """The disk libvirt calls ``target`` (vda), if the domain has it."""
    return next((d for d in domain_disks(xml) if d.target == target), None)


def named_by_target(disks: Sequence[ParentDisk], xml: str) -> tuple[ParentDisk, ...]:
    """Name QEMU's disks as libvirt does (vda, by their qdev alias): mount points and
    archives then read naturally. A disk the XML does not know keeps QEMU's name."""
    by_alias = {d.alias: d for d in domain_disks(xml) if d.alias}
    return tuple(replace(d, device=by_alias[d.device].target) if d.device in by_alias else d
                 for d in disks)


def snapshot_xml(planned: Sequence[ForkedDisk], disks: Sequence[DomainDisk],
                 name: str) -> str:
    """Disk-only snapshot onto our overlays; every other disk is named and left alone
    (libvirt would otherwise give unlisted disks overlays of its own choosing)."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    listing = ET.SubElement(root, "disks")
    ours = {d.disk.device: d for d in planned}
    for disk in disks:
        entry = ET.SubElement(listing, "disk", name=disk.target)
        forked = ours.get(disk.target)
        if forked is None:
            entry.set("snapshot", "no")
            continue
        entry.set("snapshot", "external")
        entry.set("type", "file")
        ET.SubElement(entry, "driver", type="qcow2")
        ET.SubElement(entry, "source", file=str(forked.parent_overlay))
    return ET.tostring(root, encoding="unicode")


def pointed_back(xml: str, disks: Sequence[ForkedDisk]) -> tuple[str, list[str]]:
    """``xml`` with every disk that names one of our overlays pointed back at the frozen
    image below it (libvirt writes an external snapshot into the persistent XML); the new
    XML and the devices changed (none: nothing to redefine)."""
    root = ET.fromstring(xml)
    ours = {str(d.parent_overlay): d for d in disks}
    changed = []
    for node in root.findall("./devices/disk"):
        source = node.find("source")
        disk = ours.get(source.get("file", "")) if source is not None else None
        if source is None or disk is None:
            continue
        if disk.disk.host_device:  # <disk type='block'><source dev=...>, as it was
            node.set("type", "block")
            source.attrib.pop("file", None)
            source.set("dev", str(disk.frozen))
        else:
            source.set("file", str(disk.frozen))
        for backing in node.findall("backingStore"):
            node.remove(backing)
        driver = node.find("driver")
        if driver is not None:
            driver.set("type", disk.disk.format)
        changed.append(disk.disk.device)
    return ET.tostring(root, encoding="unicode"), changed


def nvram_disk(xml: str) -> DomainDisk | None:
    """A UEFI domain's variable store (``<os><nvram>``) as a disk named ``nvram``: it is
    part of the VM's state like its disks, but no ``<disk>`` of libvirt's."""
    node = ET.fromstring(xml).find("./os/nvram")
    path = (node.text or "").strip() if node is not None else ""
    if node is None or not path:
        return None
    return DomainDisk("nvram", None, path, "file", node.get("format") or "raw", False, None)


@dataclass(frozen=True)
class RestoredDomain:
    """How a restored copy of a domain differs from the domain that was backed up."""

    name: str
    uuid: str
    disks: dict[str, tuple[str, str]]  # target (vda) -> (restored image, its format)
    nvram: str | None  # the restored UEFI variable store
    plug_nics: bool  # keep the NICs' links up (default: down, the copy stays off the LAN)
    log_dir: str  # where file consoles (serial/console type='file') write instead


def restored_xml(xml: str, restored: RestoredDomain) -> tuple[str, list[str]]:
    """The recorded (inactive) domain XML rewritten for a restored copy that can run beside
    the original: its name and UUID, its disks on the restored images, new MAC addresses
    (libvirt makes them: the old ones are removed), links down, consoles into ``log_dir``;
    a writable disk that was not restored is dropped (it is the original's image).
    Returns the XML and the targets dropped."""
    root = ET.fromstring(xml)
    _set_child(root, "name", restored.name)
    _set_child(root, "uuid", restored.uuid)
    devices = root.find("devices")
    dropped = []
    for node in devices.findall("disk") if devices is not None else []:
        target = node.find("target")
        dev = target.get("dev", "") if target is not None else ""
        if dev in restored.disks:
            _point_disk(node, *restored.disks[dev])
        elif node.find("readonly") is None and node.get("device") not in ("cdrom", "floppy"):
            devices.remove(node)  # type: ignore[union-attr]
            dropped.append(dev)
    nvram = root.find("./os/nvram")
    if nvram is not None and restored.nvram:
        nvram.text = restored.nvram
    for nic in root.findall("./devices/interface"):
        for old in nic.findall("mac") + nic.findall("link") + nic.findall("target"):
            nic.remove(old)  # the original's MAC and tap device name, its link state
        if not restored.plug_nics:
            ET.SubElement(nic, "link", state="down")
    for number, console in enumerate(root.findall("./devices/serial")
                                     + root.findall("./devices/console")):
        source = console.find("source")
        if console.get("type") == "file" and source is not None:
            source.set("path", f"{restored.log_dir}/console{number}.log")
    return ET.tostring(root, encoding="unicode"), dropped


def _set_child(root: ET.Element, tag: str, text: str) -> None:
    node = root.find(tag)
    if node is None:
        node = ET.SubElement(root, tag)
    node.text = text


def _point_disk(node: ET.Element, path: str, fmt: str) -> None:
    node.set("type", "file")
    for child in node.findall("source") + node.findall("backingStore"):
        node.remove(child)
    source = ET.Element("source", file=path)
    node.insert(1 if node.find("driver") is not None else 0, source)
    driver = node.find("driver")
    if driver is not None:
        driver.set("type", fmt)
