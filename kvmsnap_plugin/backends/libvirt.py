"""A libvirt domain, reached through libvirt-python.

libvirt must keep believing what is true, so every change to the domain's state and disks
goes through libvirt: the pause is ``virDomainSuspend``, the disk snapshot a disk-only,
metadata-less, atomic external snapshot (``snapshotCreateXML``) onto overlays kvmsnap
created beforehand, and the chain is given back with an active ``blockCommit`` into the
frozen image + pivot (or, under another snapshot, a ``blockCommit`` from our overlay down
to the frozen image, no pivot). Raw QMP snapshots behind libvirt's back leave it with a stale view
("Need a root block node").

Only the RAM snapshot goes through QEMU's monitor (libvirt has no background snapshot),
through :class:`~kvmsnap_plugin.backends.libvirt_monitor.DomainMonitor`; and so does the
UEFI variable store (the domain's ``<nvram>``, a pflash), which is no libvirt disk and which
libvirt's snapshots leave out: its overlay is put on and committed back over QMP as for a
bare QEMU, inside the same pause, and the commit leaves libvirt's own nodes as they were.

The clone is a bare QEMU started from the domain's ``/proc/PID/cmdline`` (see
:mod:`kvmsnap_plugin.vm.clone`): libvirt never learns of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from kvmsnap_plugin.backends.libvirt_host import find_qemu_pid, offline_disk
from kvmsnap_plugin.backends.libvirt_monitor import (
    DomainMonitor,
    libvirt_errors,
    libvirt_module,
)
from kvmsnap_plugin.backends.libvirt_xml import (
    disk_by_target,
    domain_disks,
    named_by_target,
    nvram_disk,
    pointed_back,
    snapshot_xml,
)
from kvmsnap_plugin.backends.qmp import QmpBackend
from kvmsnap_plugin.errors import StepTimeout, VMError
from kvmsnap_plugin.host import faults, process
from kvmsnap_plugin.model import DEFAULT_LIBVIRT_URI, ForkedDisk, JournalState, Parent
from kvmsnap_plugin.vm.parent import (
    block_disks,
    check_disks,
    check_runstate,
    read_cmdline,
)

log = logging.getLogger(__name__)

#: what the UEFI variable store is called (libvirt's ``<nvram>``), running or shut off
NVRAM = "nvram"

__all__ = ["DomainMonitor", "LibvirtBackend", "connect", "find_domain", "reopen"]


def connect(uri: str) -> Any:
    """A connection to libvirt; refuses URIs of other hosts (the clone runs here)."""
    libvirt = libvirt_module()
    host = urlparse(uri).hostname
    if host not in (None, "", "localhost", "127.0.0.1", "::1"):
        raise VMError(f"{uri} is a remote libvirt: kvmsnap forks VMs on its own host only",
                      "run kvmsnap on the VM's host with a local URI such as qemu:///system")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise VMError(f"cannot connect to libvirt at {uri}: {exc}",
                      "start libvirtd (or virtqemud), run as root, or pass the right "
                      "--libvirt-uri") from None


def find_domain(conn: Any, name: str, uuid: str | None = None) -> Any | None:
    """The domain by UUID if known (a new domain may have taken the name), else by name;
    None if there is none."""
    libvirt = libvirt_module()
    try:
        return conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VMError(f"cannot look up domain {name!r}: {exc}") from None


class LibvirtBackend:
    """A libvirt domain by name (or, for recovery, by UUID): running or shut off."""

    kind = "libvirt"

    def __init__(self, domain: str, uri: str | None = None, uuid: str | None = None, *,
                 must_exist: bool = True) -> None:
        self.domain = domain
        self.uri = uri or DEFAULT_LIBVIRT_URI
        self.uuid = uuid  # known to recovery: the name may since be another domain's
        self.must_exist = must_exist
        self.conn: Any = None
        self.dom: Any = None
        self.pid: int | None = None
        self._monitor: DomainMonitor | None = None

    def __enter__(self) -> LibvirtBackend:
        self.conn = connect(self.uri)
        try:
            self.dom = find_domain(self.conn, self.domain, self.uuid)
        except BaseException:
            self.__exit__()
            raise
        if self.dom is None and self.must_exist:
            self.__exit__()
            raise VMError(f"there is no libvirt domain named {self.domain!r} at {self.uri}",
                          f"check the name with `virsh -c {self.uri} list --all`")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._monitor:
            self._monitor.close()
            self._monitor = None
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    @property
    def monitor(self) -> DomainMonitor:
        if self._monitor is None:
            self._monitor = DomainMonitor(self.conn, self.dom)
        return self._monitor

    def online(self) -> bool:
        with libvirt_errors(f"asking libvirt about {self.domain}"):
            return self.dom is not None and bool(self.dom.isActive())

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind, "domain": self.domain, "libvirt_uri": self.uri,
                "uuid": self.dom.UUIDString(),
                "parent": process.identity(self.pid) if self.pid else None}

    # -- describe ---------------------------------------------------------------------------
    def describe(self) -> Parent:
        with libvirt_errors(f"describing domain {self.domain}",
                            "is it still defined and running? see `virsh list --all`"):
            libvirt = libvirt_module()
            state, _reason = self.dom.state()
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
                reason = suspended_reason(libvirt, self.dom)
                if reason:
                    raise VMError(f"domain {self.domain} is not shut off but {reason}: its "
                                  "disks are those of a running guest",
                                  f"start it (`virsh start {self.domain}`) and back it up "
                                  "running, or shut it down properly")
                return self._describe_offline()
            if state == libvirt.VIR_DOMAIN_PAUSED:
                raise VMError(f"domain {self.domain} is paused: a paused guest cannot shut "
                              f"its copy down", f"resume it (`virsh resume {self.domain}`), "
                              "or shut it down and back it up offline")
            if state != libvirt.VIR_DOMAIN_RUNNING:
                raise VMError(f"domain {self.domain} is neither running nor shut off "
                              f"(libvirt state {state})",
                              "start it, or shut it down to back it up offline")
            return self._describe_running()

    def _describe_running(self) -> Parent:
        self.pid = find_qemu_pid(self.domain, self.dom.UUIDString())
        argv = read_cmdline(self.pid)  # checked for a clone by ParentHandle.describe
        check_runstate(self.monitor)
        version = self.monitor.execute("query-version")["qemu"]
        disks = named_by_target(block_disks(self.monitor.execute("query-block")),
                                self.dom.XMLDesc(0))
        # libvirt's UEFI variable store: "nvram", as in its XML and when shut off
        disks = tuple(replace(d, device=NVRAM) if d.flash and not d.read_only else d
                      for d in disks)
        check_disks(self.domain, disks)
        return Parent(None, self.pid, self.domain, tuple(argv),
                      (version["major"], version["minor"], version["micro"]), disks,
                      domain_xml=self._persistent_xml())

    def _describe_offline(self) -> Parent:
        """A shut-off domain: its images, from its persistent XML, are consistent as they
        are (the guest shut down, or was never started); nothing to fork."""
        # An empty CD drive has no source; a writable disk without a file (a pool volume,
        # a network disk) stays in, to be refused by name below rather than skipped.
        xml = self.dom.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)
        disks = tuple(offline_disk(d) for d in domain_disks(xml) if d.source or not d.read_only)
        nvram = nvram_disk(xml)
        if nvram and os.path.isfile(nvram.source or ""):  # made at the first start
            disks += (replace(offline_disk(nvram), flash=True),)
        check_disks(self.domain, disks)
        log.info("%s is shut off: backing up its disk images as they are, without a fork",
                 self.domain)
        return Parent(None, 0, self.domain, (), (0, 0, 0), disks, offline=True,
                      domain_xml=xml)

    def _persistent_xml(self) -> str:
        """The definition a restore rewrites (without VIR_DOMAIN_XML_SECURE: no passwords)."""
        return self.dom.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)

    # -- the fork ---------------------------------------------------------------------------
    def pause(self) -> None:
        with libvirt_errors("pausing the domain"):
            self.dom.suspend()

    def resume(self) -> None:
        with libvirt_errors("resuming the domain"):
            self.dom.resume()

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """libvirt opens its disks' overlays during the snapshot; a flash's, QMP."""
        _FlashOverQmp(self.monitor).attach_overlays(_flashes(planned))

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """A disk's overlay that is no layer is not open; a flash's was opened by QMP."""
        _FlashOverQmp(self.monitor).detach_overlays(_flashes(planned))

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        libvirt = libvirt_module()
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        with libvirt_errors("the disk snapshot through libvirt failed",
                            "see the message; the domain was resumed on its own chain"):
            disks = [d for d in planned if not d.disk.flash]
            if disks:
                xml = snapshot_xml(disks, domain_disks(self.dom.XMLDesc(0)), name)
                self.dom.snapshotCreateXML(xml, flags)
        # Still paused: the flash's snapshot is of the same instant as the disks'.
        _FlashOverQmp(self.monitor).snapshot_disks(_flashes(planned), name)

    # -- the commit back --------------------------------------------------------------------
    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        """Like ``virsh blockcommit --active --pivot --base FROZEN``: without the base,
        libvirt would merge into the *bottom* of the chain."""
        if disk.disk.flash:
            return _FlashOverQmp(self.monitor).commit_one(disk, timeout)
        libvirt = libvirt_module()
        target = disk.disk.device
        with libvirt_errors(f"block commit of {target}"):
            current = disk_by_target(self.dom.XMLDesc(0), target)
            below = current.backing if current else None
            if below != str(disk.frozen):
                raise VMError(f"{target}: below kvmsnap's overlay is {below}, not "
                              f"{disk.frozen}", "inspect the chain with `virsh domblklist`")
            job = self.dom.blockJobInfo(target, 0)
            if not job:
                self.dom.blockCommit(target, str(disk.frozen), None, 0,
                                     libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
                faults.point("commit")
            elif job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
                raise VMError(f"{target} is busy with another block job (type {job['type']})",
                              "wait for it to finish (`virsh blockjob`), then recover")
            return self._pivot_when_ready(target, timeout)

    def commit_below(self, disk: ForkedDisk, root: str, timeout: float) -> int:
        """Like ``virsh blockcommit --base FROZEN --top OVERLAY`` (not --active): libvirt
        rewrites the upper image's backing and drops the overlay from the chain."""
        if disk.disk.flash:
            return _FlashOverQmp(self.monitor).commit_below(disk, root, timeout)
        libvirt = libvirt_module()
        target = disk.disk.device
        with libvirt_errors(f"block commit of {target} below another snapshot"):
            job = self.dom.blockJobInfo(target, 0)
            if not job:
                self.dom.blockCommit(target, str(disk.frozen), str(disk.parent_overlay), 0, 0)
                faults.point("commit")
            elif job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT:
                raise VMError(f"{target} is busy with another block job (type {job['type']})",
                              "wait for it to finish (`virsh blockjob`), then recover")
            return self._wait_job_gone(target, timeout)

    def _wait_job_gone(self, target: str, timeout: float) -> int:
        """A commit that needs no pivot: until libvirt no longer lists the job."""
        deadline = time.monotonic() + timeout
        written = 0
        while info := self.dom.blockJobInfo(target, 0):
            written = max(written, int(info.get("end", 0)))
            if time.monotonic() > deadline:
                with contextlib.suppress(libvirt_module().libvirtError):
                    self.dom.blockJobAbort(target, 0)
                raise StepTimeout(f"committing {target} took more than {timeout:g} s")
            time.sleep(0.05)
        return written

    def _pivot_when_ready(self, target: str, timeout: float) -> int:
        """Pivot once libvirt has seen the job ready (it refuses before: retried)."""
        libvirt = libvirt_module()
        deadline = time.monotonic() + timeout
        written = 0
        while True:
            info = self.dom.blockJobInfo(target, 0)
            if not info:
                raise VMError(f"the commit job of {target} ended without pivoting",
                              "see the domain's log in /var/log/libvirt/qemu")
            # libvirt shows a ready job with nothing to copy as 1 of 1, never 0 of 0
            written = max(written, int(info.get("end", 0)) if info.get("end", 0) > 1 else 0)
            if info.get("end") and info.get("cur") == info.get("end"):
                try:
                    self.dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    return written
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                        raise
            if time.monotonic() > deadline:
                with contextlib.suppress(libvirt.libvirtError):
                    self.dom.blockJobAbort(target, 0)
                raise StepTimeout(f"committing {target} took more than {timeout:g} s")
            time.sleep(0.05)

    # -- recovery ---------------------------------------------------------------------------
    def offline_refusal(self, disks: Sequence[ForkedDisk]) -> str | None:
        """Not running is not shut off: a managed-saved, saved or migrated domain still runs
        on the overlays (its memory image, or another host, writes or will write them)."""
        if self.dom is None:
            return None  # undefined since: nothing of libvirt's uses the overlays
        with libvirt_errors(f"asking libvirt about {self.domain}"):
            reason = suspended_reason(libvirt_module(), self.dom)
            if reason:
                return f"domain {self.domain} is not shut off but {reason}"
            xml = self.dom.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)
        ours = {str(d.parent_overlay) for d in disks}
        for disk in domain_disks(xml):
            if disk.source and disk.source not in ours and disk.kind == "file":
                above = set(offline_disk(disk).chain[1:]) & ours
                if above:
                    return (f"{disk.source} of domain {self.domain} is backed by "
                            f"{', '.join(sorted(above))}")
        return None

    def point_config_back(self, disks: Sequence[ForkedDisk]) -> list[str]:
        """A shut-off domain whose persistent XML still names our overlay (libvirt writes
        an external snapshot into it) would next start from a deleted file."""
        libvirt = libvirt_module()
        with libvirt_errors(f"redefining {self.domain} on its own images"):
            if self.dom is None or not self.dom.isPersistent():
                return []
            xml, changed = pointed_back(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                                        disks)
            if changed:
                self.conn.defineXML(xml)
        return changed


class _FlashOverQmp(QmpBackend):
    """A bare QEMU's overlays and commits, on the domain's monitor: for firmware flashes."""

    def __init__(self, monitor: DomainMonitor) -> None:  # no socket: libvirt's monitor
        self.monitor = monitor  # type: ignore[assignment]

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        if planned:
            super().snapshot_disks(planned, name)


def _flashes(planned: Sequence[ForkedDisk]) -> list[ForkedDisk]:
    return [d for d in planned if d.disk.flash]


def suspended_reason(libvirt: Any, dom: Any) -> str | None:
    """Why a domain that is not running is not shut off either, or None: a managed-save
    image, a saved state, a migration to another host, a snapshot reverted to."""
    if dom.hasManagedSaveImage(0):
        return "managed-saved (`virsh start` resumes it from its memory image)"
    state, reason = dom.state()
    if state != libvirt.VIR_DOMAIN_SHUTOFF:
        return None
    return {libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved to a file (`virsh restore` resumes it)",
            libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated to another host",
            libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "reverted to a snapshot",
            }.get(reason)


def reopen(state: JournalState) -> LibvirtBackend:
    """The domain a journal names, found by its UUID. Opening it raises if libvirt cannot
    be reached: an overlay may be a running domain's active layer, and only libvirt knows."""
    return LibvirtBackend(state.domain or "", state.libvirt_uri, state.uuid or None,
                          must_exist=False)
