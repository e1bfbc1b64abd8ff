"""A libvirt domain, reached through libvirt-python.

libvirt must keep believing what is true, so every change to the domain's disks goes
through libvirt: the fork is ``virDomainSuspend`` + a disk-only, metadata-less, atomic
external snapshot (``snapshotCreateXML``) onto overlays kvmsnap created beforehand, and the
chain is given back with an active ``blockCommit`` into the frozen image + pivot. Raw QMP
snapshots behind libvirt's back leave it with a stale view ("Need a root block node").

Only the RAM snapshot goes through QEMU's monitor (libvirt has no background snapshot):
``getfd`` with the state file passed along (``qemuMonitorCommandWithFiles``; ``migrate
exec:`` would be killed by libvirt's seccomp sandbox), then ``migrate fd:``. For that,
:class:`DomainMonitor` looks like a :class:`~kvmsnap_plugin.vm.qmp.QmpSession`, so the fork
engine's migration helpers (capabilities, watching RESUME, waiting for the end) run on it
unchanged; ``stop`` and ``cont`` are mapped to ``suspend``/``resume`` so libvirt's idea of
the run state never drifts.

The clone is a bare QEMU started from the domain's ``/proc/PID/cmdline`` (see
:mod:`kvmsnap_plugin.vm.clone`): libvirt never learns of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kvmsnap_plugin.backends.qmp import commit_offline
from kvmsnap_plugin.errors import HostError, KvmsnapError, StepTimeout, VMError
from kvmsnap_plugin.fork.chain import commit_each
from kvmsnap_plugin.fork.engine import (
    STATE_FD_NAME,
    _configure_migration,
    _migration_capabilities,
    _open_state_fd,
    _restore_capabilities,
    _wait_for_resume,
    _wait_migration,
    settle_migration,
)
from kvmsnap_plugin.host import faults, process
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.model import (
    Commit,
    ForkedDisk,
    ForkPoint,
    JournalState,
    Parent,
    ParentDisk,
    Phase,
)
from kvmsnap_plugin.vm.clone import copy_master_key
from kvmsnap_plugin.vm.parent import block_disks, check_runstate, read_cmdline, refuse_unclonable
from kvmsnap_plugin.vm.qmp import Event

log = logging.getLogger("kvmsnap")

DEFAULT_URI = "qemu:///system"
COMMIT_TIMEOUT = 3600.0
FORK_TIMEOUT = 600.0

_loop_lock = threading.Lock()
_loop_started = False


def _libvirt() -> Any:
    """libvirt-python, with its event loop running (events need it; once per process)."""
    global _loop_started
    try:
        import libvirt
    except ImportError:
        raise HostError("libvirt-python is not installed",
                        "pip install libvirt-python (needs libvirt-dev and pkg-config), "
                        "or run `make venv`") from None
    with _loop_lock:
        if not _loop_started:
            # Errors arrive as exceptions; libvirt would also print each one to stderr.
            libvirt.registerErrorHandler(lambda *_: None, None)
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_loop, args=(libvirt,), name="libvirt-events",
                             daemon=True).start()
            _loop_started = True
    return libvirt


def _run_loop(libvirt: Any) -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def connect(uri: str) -> Any:
    """A connection to libvirt; refuses URIs of other hosts (the clone runs here)."""
    libvirt = _libvirt()
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


def lookup(conn: Any, name: str, uri: str) -> Any:
    libvirt = _libvirt()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise VMError(f"there is no libvirt domain named {name!r} at {uri}",
                          f"check the name with `virsh -c {uri} list --all`") from None
        raise VMError(f"cannot look up domain {name!r}: {exc}") from None


@contextlib.contextmanager
def libvirt_errors(what: str, fix: str | None = None) -> Iterator[None]:
    """libvirt's exceptions as one-line VMErrors saying what was being done."""
    libvirt = _libvirt()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise VMError(f"{what}: {exc}", fix) from None


# -- the monitor, shaped like a QmpSession --------------------------------------------------------
class DomainMonitor:
    """QMP through libvirt, with QEMU's events (and their timestamps) as they arrive.

    ``stop``/``cont`` become ``virDomainSuspend``/``virDomainResume``: libvirt's job lock and
    state tracking stay right, and the events QEMU emits are the same.
    """

    def __init__(self, conn: Any, dom: Any) -> None:
        import libvirt_qemu

        self._qemu = libvirt_qemu
        self.conn = conn
        self.dom = dom
        self._pending: list[Event] = []
        self._arrived = threading.Condition()
        self._callback = libvirt_qemu.qemuMonitorEventRegister(conn, dom, None,
                                                               self._on_event, None, 0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._qemu.qemuMonitorEventDeregister(self.conn, self._callback)

    def _on_event(self, _conn: Any, _dom: Any, name: str, seconds: int, micros: int,
                  details: str | None, _opaque: Any) -> None:
        data = json.loads(details) if details else {}
        with self._arrived:
            self._pending.append(Event(name, data, seconds + micros / 1e6))
            self._arrived.notify_all()

    # -- commands -------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        if command == "stop":
            with libvirt_errors("pausing the domain"):
                self.dom.suspend()
            return {}
        if command == "cont":
            with libvirt_errors("resuming the domain"):
                self.dom.resume()
            return {}
        return self._qmp(command, arguments, ())

    def send_fd(self, fd: int, name: str) -> None:
        self._qmp("getfd", {"fdname": name}, (fd,))

    def runstate(self) -> str:
        return self.execute("query-status")["status"]

    def _qmp(self, command: str, arguments: dict[str, Any] | None,
             files: Sequence[int]) -> Any:
        message = json.dumps({"execute": command, **({"arguments": arguments}
                                                     if arguments else {})})
        log.debug("qmp (libvirt) %s", message)
        with libvirt_errors(f"QMP {command} through libvirt",
                            "is the domain still running? see its log in /var/log/libvirt"):
            if files:
                answer, _ = self._qemu.qemuMonitorCommandWithFiles(self.dom, message,
                                                                    list(files), 0)
            else:
                answer = self._qemu.qemuMonitorCommand(self.dom, message, 0)
        reply = json.loads(answer)
        if "error" in reply:
            raise VMError(f"QMP {command} failed: {reply['error'].get('desc')}",
                          "the VM refused the command; see the message")
        return reply.get("return")

    # -- events ---------------------------------------------------------------------------
    def events(self) -> list[Event]:
        with self._arrived:
            taken, self._pending = self._pending, []
        return taken

    def wait_event(self, names: str | Iterable[str], timeout: float,
                   match: Callable[[Event], bool] = lambda e: True) -> Event:
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i, event in enumerate(self._pending):
                    if event.name in wanted and match(event):
                        return self._pending.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StepTimeout(f"no {'/'.join(sorted(wanted))} event within "
                                      f"{timeout:g} s")
                self._arrived.wait(remaining)


# -- the domain's XML -----------------------------------------------------------------------------
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
    disks = []
    for node in ET.fromstring(xml).findall("./devices/disk"):
        target = node.find("target")
        source = node.find("source")
        alias = node.find("alias")
        driver = node.find("driver")
        backing = node.find("backingStore/source")
        disks.append(DomainDisk(
            target=target.get("dev", "") if target is not None else "",
            alias=alias.get("name") if alias is not None else None,
            source=_source_path(source),
            kind=node.get("type", "file"),
            format=driver.get("type") if driver is not None else None,
            read_only=node.find("readonly") is not None or node.get("device") == "cdrom",
            backing=_source_path(backing)))
    return disks


def _source_path(source: ET.Element | None) -> str | None:
    if source is None:
        return None
    return source.get("file") or source.get("dev")


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


# -- the backend ----------------------------------------------------------------------------------
class LibvirtParent:
    """A libvirt domain by name: running (forked) or shut off (backed up as it is)."""

    kind = "libvirt"

    def __init__(self, domain: str, uri: str = DEFAULT_URI, *,
                 fork_timeout: float = FORK_TIMEOUT,
                 commit_timeout: float = COMMIT_TIMEOUT) -> None:
        self.domain = domain
        self.uri = uri or DEFAULT_URI
        self.fork_timeout = fork_timeout
        self.commit_timeout = commit_timeout
        self.conn: Any = None
        self.dom: Any = None
        self.pid: int | None = None
        self._monitor: DomainMonitor | None = None

    def __enter__(self) -> LibvirtParent:
        self.conn = connect(self.uri)
        try:
            self.dom = lookup(self.conn, self.domain, self.uri)
        except BaseException:
            self.__exit__()
            raise
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

    # -- describe ---------------------------------------------------------------------------
    def describe(self) -> Parent:
        with libvirt_errors(f"describing domain {self.domain}",
                            "is it still defined and running? see `virsh list --all`"):
            return self._describe()

    def _describe(self) -> Parent:
        libvirt = _libvirt()
        state, _reason = self.dom.state()
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            return self._describe_offline()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            raise VMError(f"domain {self.domain} is paused: a paused guest cannot shut its "
                          "copy down", f"resume it (`virsh resume {self.domain}`), or shut "
                          "it down and back it up offline")
        if state != libvirt.VIR_DOMAIN_RUNNING:
            raise VMError(f"domain {self.domain} is neither running nor shut off "
                          f"(libvirt state {state})",
                          "start it, or shut it down to back it up offline")
        return self._describe_running()

    def _describe_running(self) -> Parent:
        self.pid = find_qemu_pid(self.domain, self.dom.UUIDString())
        argv = read_cmdline(self.pid)
        refuse_unclonable(argv)
        check_runstate(self.monitor)  # type: ignore[arg-type]  # QmpSession-shaped
        version = self.monitor.execute("query-version")["qemu"]
        by_alias = {d.alias: d for d in domain_disks(self.dom.XMLDesc(0)) if d.alias}
        disks = tuple(_named_by_target(d, by_alias)
                      for d in block_disks(self.monitor.execute("query-block")))
        _check_disks(self.domain, disks)
        return Parent(None, self.pid, self.domain, tuple(argv),
                      (version["major"], version["minor"], version["micro"]), disks)

    def _describe_offline(self) -> Parent:
        """A shut-off domain: its images, from its persistent XML, are consistent as they
        are (the guest shut down, or was never started); nothing to fork."""
        # An empty CD drive has no source; a writable disk without a file (a pool volume,
        # a network disk) stays in, to be refused by name below rather than skipped.
        disks = tuple(_offline_disk(d) for d in
                      domain_disks(self.dom.XMLDesc(_libvirt().VIR_DOMAIN_XML_INACTIVE))
                      if d.source or not d.read_only)
        _check_disks(self.domain, disks)
        log.info("%s is shut off: backing up its disk images as they are, without a fork",
                 self.domain)
        return Parent(None, 0, self.domain, (), (0, 0, 0), disks, offline=True)

    # -- fork -------------------------------------------------------------------------------
    def fork(self, parent: Parent, planned: tuple[ForkedDisk, ...], state_file: Path,
             method: str) -> ForkPoint:
        """Pause, snapshot the disks through libvirt and the RAM through QEMU, resume.

        On failure the domain runs again on its original chain before the error propagates.
        """
        if parent.offline:
            raise VMError(f"domain {parent.name} is shut off: there is nothing to fork",
                          "back its images up directly (the pipeline does, for offline "
                          "domains)")
        copy_master_key(parent.argv, state_file.parent, Path(f"/proc/{parent.pid}/root"))
        self._create_overlays(planned)
        monitor = self.monitor
        saved: dict[str, bool] | None = None
        applied = False
        writer = None
        try:
            saved = _migration_capabilities(monitor)  # type: ignore[arg-type]
            method = _configure_migration(monitor, method)  # type: ignore[arg-type]
            writer = _open_state_fd(monitor, state_file, method)  # type: ignore[arg-type]
            log.info("pausing %s for the fork (%s)", parent.name, method)
            with libvirt_errors(f"forking {parent.name}"):
                point = self._pause_and_snapshot(parent, planned, state_file, method)
            applied = True
            writer.finish()
            return point
        except BaseException:
            applied = applied or self._snapshot_applied(planned)
            self._recover_after_failed_fork(planned, applied)
            state_file.unlink(missing_ok=True)
            raise
        finally:
            if writer:
                writer.close()
            if saved is not None:
                _restore_capabilities(monitor, saved)  # type: ignore[arg-type]

    def _create_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """Before the pause: libvirt creating them itself doubles it (~80 vs ~40 ms)."""
        try:
            for forked in planned:
                disk = forked.disk
                create_overlay(forked.parent_overlay, disk.filename, disk.format,
                               disk.virtual_size)
        except BaseException:
            for forked in planned:
                forked.parent_overlay.unlink(missing_ok=True)
            raise

    def _pause_and_snapshot(self, parent: Parent, planned: Sequence[ForkedDisk],
                            state_file: Path, method: str) -> ForkPoint:
        libvirt = _libvirt()
        monitor = self.monitor
        xml = snapshot_xml(planned, domain_disks(self.dom.XMLDesc(0)),
                           f"kvmsnap-{state_file.parent.name}")
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        monitor.events()  # forget older events: STOP/RESUME below must be ours
        monitor.execute("stop")
        stop = monitor.wait_event("STOP", 10)
        faults.point("paused")
        started = time.monotonic()
        with libvirt_errors("the disk snapshot through libvirt failed",
                            "see the message; the domain was resumed on its own chain"):
            self.dom.snapshotCreateXML(xml, flags)
        disk_ms = (time.monotonic() - started) * 1000
        faults.point("disk-snapshot")
        monitor.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        faults.point("ram-save")
        resume = _wait_for_resume(monitor, method, self.fork_timeout)  # type: ignore[arg-type]
        pause_ms = (resume.timestamp - stop.timestamp) * 1000
        log.info("%s ran again after %.1f ms; saving its RAM", parent.name, pause_ms)
        info = _wait_migration(monitor, self.fork_timeout)  # type: ignore[arg-type]
        ram = info.get("ram", {})
        return ForkPoint(parent, tuple(planned), state_file, method, pause_ms, disk_ms,
                         info.get("total-time", 0) / 1000, int(ram.get("total", 0)),
                         info.get("downtime"))

    def _snapshot_applied(self, planned: Sequence[ForkedDisk]) -> bool:
        try:
            tops = {d.source for d in domain_disks(self.dom.XMLDesc(0))}
        except Exception:
            return False
        return any(str(d.parent_overlay) in tops for d in planned)

    def _recover_after_failed_fork(self, planned: Sequence[ForkedDisk],
                                   applied: bool) -> None:
        """The domain runs, on its original chain, holding every write."""
        try:
            with libvirt_errors(f"resuming {self.domain}"):
                settle_migration(self.monitor)  # type: ignore[arg-type]
                self._resume_if_paused()
        except KvmsnapError as exc:
            log.error("could not resume %s after a failed fork: %s", self.domain, exc)
        try:
            if applied:
                self.commit_back(planned)
            else:
                for forked in planned:
                    forked.parent_overlay.unlink(missing_ok=True)
        except KvmsnapError as exc:
            log.error("could not restore the disk chain of %s: %s (run `kvmsnap recover`)",
                      self.domain, exc)

    def _resume_if_paused(self) -> str | None:
        """Resume the domain if it is paused; returns the state it was in, if it was."""
        libvirt = _libvirt()
        deadline = time.monotonic() + 30
        while self.monitor.runstate() == "finish-migrate" and time.monotonic() < deadline:
            time.sleep(0.1)
        state, _ = self.dom.state()
        if state != libvirt.VIR_DOMAIN_PAUSED:
            return None
        was = self.monitor.runstate()
        self.monitor.execute("cont")
        return was

    # -- commit back ------------------------------------------------------------------------
    def commit_back(self, disks: Sequence[ForkedDisk]) -> list[Commit]:
        """Active-commit each overlay into its frozen image and pivot, through libvirt.

        Like ``virsh blockcommit --active --pivot --base FROZEN``: without the base, libvirt
        would merge into the *bottom* of the chain. Every disk is attempted.
        """
        def commit_one(disk: ForkedDisk) -> Commit:
            with libvirt_errors(f"block commit of {disk.disk.device}"):
                return self._commit_one(disk)

        return commit_each(disks, commit_one)

    def _commit_one(self, disk: ForkedDisk) -> Commit:
        libvirt = _libvirt()
        target = disk.disk.device
        started = time.monotonic()
        current = _disk_by_target(self.dom.XMLDesc(0), target)
        if current is None or current.source != str(disk.parent_overlay):
            # Not (or no longer) on top: it holds no write the domain still needs.
            log.debug("%s: %s is not the active layer; nothing to commit", target,
                      disk.parent_overlay.name)
            disk.parent_overlay.unlink(missing_ok=True)
            return Commit(target, 0.0, 0)
        if current.backing != str(disk.frozen):
            raise VMError(f"{target}: below kvmsnap's overlay is {current.backing}, not "
                          f"{disk.frozen}", "inspect the chain with `virsh domblklist`")
        log.info("committing the writes of %s on %s back into %s", self.domain, target,
                 disk.frozen.name)
        job = self.dom.blockJobInfo(target, 0)
        if not job:
            self.dom.blockCommit(target, str(disk.frozen), None, 0,
                                 libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            faults.point("commit")
        elif job.get("type") != libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT:
            raise VMError(f"{target} is busy with another block job (type {job['type']})",
                          "wait for it to finish (`virsh blockjob`), then recover")
        written = self._pivot_when_ready(target)
        disk.parent_overlay.unlink(missing_ok=True)
        return Commit(target, time.monotonic() - started, written)

    def _pivot_when_ready(self, target: str) -> int:
        """Pivot once libvirt has seen the job ready (it refuses before: retried)."""
        libvirt = _libvirt()
        deadline = time.monotonic() + self.commit_timeout
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
                raise StepTimeout(f"committing {target} took more than "
                                  f"{self.commit_timeout:g} s")
            time.sleep(0.05)

    def journal_fields(self) -> dict[str, Any]:
        return {"backend": self.kind, "domain": self.domain, "libvirt_uri": self.uri,
                "uuid": self.dom.UUIDString(),
                "parent": process.identity(self.pid) if self.pid else None}


# -- recovery -------------------------------------------------------------------------------------
def restore(state: JournalState, disks: list[ForkedDisk], result: Any) -> None:
    """Recovery for a domain: online if it runs (resume, commit + pivot), else offline.

    If libvirt cannot be reached this raises: an overlay may be a running domain's active
    layer, and only libvirt can say.
    """
    uri = state.libvirt_uri or DEFAULT_URI
    backend = LibvirtParent(state.domain or "", uri)
    backend.conn = connect(uri)
    try:
        with libvirt_errors(f"recovering domain {backend.domain}",
                            "check the domain with `virsh domblklist`, then run `kvmsnap "
                            "recover` again"):
            backend.dom = _journaled_domain(backend.conn, state)
            if backend.dom is not None and backend.dom.isActive():
                _restore_running(backend, state, disks, result)
            else:
                commit_offline(disks, result)
                if backend.dom is not None:
                    _point_config_back(backend, disks, result)
    finally:
        backend.__exit__()


def _journaled_domain(conn: Any, state: JournalState) -> Any:
    """The domain the journal names, by UUID (a new domain may have taken its name)."""
    libvirt = _libvirt()
    try:
        if state.uuid:
            return conn.lookupByUUIDString(state.uuid)
        return conn.lookupByName(state.domain)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VMError(f"cannot look up domain {state.domain}: {exc}") from None


def _restore_running(backend: LibvirtParent, state: JournalState,
                     disks: list[ForkedDisk], result: Any) -> None:
    same_qemu = process.same_process(state.parent) is not None
    if same_qemu and state.phase is Phase.FORKING:
        monitor = backend.monitor
        if monitor.execute("query-migrate").get("status") in ("setup", "active", "device"):
            # Cancelling a background snapshot mid-way can hang the guest (QEMU 7.2).
            ended = settle_migration(monitor)  # type: ignore[arg-type]
            result.did(f"let an unfinished RAM snapshot end ({ended})")
        was = backend._resume_if_paused()
        if was:
            result.did(f"resumed domain {backend.domain} (it was {was})")
        _restore_capabilities(backend.monitor, {})  # type: ignore[arg-type]
    if not disks:
        return
    tops = {d.source for d in domain_disks(backend.dom.XMLDesc(0))}
    active = [d for d in disks if str(d.parent_overlay) in tops]
    for commit in backend.commit_back(active):
        result.did(f"committed the domain's overlay of {commit.device} back")
    for disk in disks:
        if disk not in active and disk.parent_overlay.exists():
            disk.parent_overlay.unlink()  # never used by the domain: holds no guest data
            result.did(f"deleted the unused overlay {disk.parent_overlay.name}")


def _point_config_back(backend: LibvirtParent, disks: list[ForkedDisk],
                       result: Any) -> None:
    """A shut-off domain whose persistent XML still names our overlay (libvirt writes an
    external snapshot into it) would next start from a deleted file: point it back at the
    image the overlay was committed into."""
    libvirt = _libvirt()
    if not backend.dom.isPersistent():
        return
    root = ET.fromstring(backend.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    ours = {str(d.parent_overlay): d for d in disks}
    changed = []
    for node in root.findall("./devices/disk"):
        source = node.find("source")
        disk = ours.get(source.get("file", "")) if source is not None else None
        if disk is None:
            continue
        source.set("file", str(disk.frozen))
        for backing in node.findall("backingStore"):
            node.remove(backing)
        driver = node.find("driver")
        if driver is not None:
            driver.set("type", disk.disk.format)
        changed.append(disk.disk.device)
    if changed:
        with libvirt_errors(f"redefining {backend.domain} on its own images"):
            backend.conn.defineXML(ET.tostring(root, encoding="unicode"))
        result.did(f"pointed the configuration of {backend.domain} back at its images "
                   f"({', '.join(changed)})")


# -- helpers --------------------------------------------------------------------------------------
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


def _named_by_target(disk: ParentDisk, by_alias: dict[str, DomainDisk]) -> ParentDisk:
    """Name disks as libvirt does (vda): mount points and archives then read naturally."""
    known = by_alias.get(disk.device)
    return replace(disk, device=known.target) if known else disk


def _disk_by_target(xml: str, target: str) -> DomainDisk | None:
    return next((d for d in domain_disks(xml) if d.target == target), None)


def _offline_disk(disk: DomainDisk) -> ParentDisk:
    source = disk.source or ""
    info: list[dict[str, Any]] = []
    if disk.kind == "file" and Path(source).is_file():
        info = json.loads(process.run(["qemu-img", "info", "--backing-chain",
                                       "--output=json", source], timeout=60).stdout)
    top = info[0] if info else {}
    return ParentDisk(device=disk.target, node="", filename=source,
                      format=disk.format or top.get("format", "raw"),
                      virtual_size=int(top.get("virtual-size", 0)),
                      read_only=disk.read_only,
                      chain=tuple(i.get("filename", "") for i in info))


def _check_disks(name: str, disks: Sequence[ParentDisk]) -> None:
    if not any(not d.read_only for d in disks):
        raise VMError(f"{name} has no writable disk: there is nothing to back up",
                      "attach the domain's disks read-write, or back the images up directly")
    for disk in disks:
        if not disk.read_only and not (disk.filename.startswith("/")
                                       and Path(disk.filename).is_file()):
            raise VMError(f"disk {disk.device} of {name} is not a local image file "
                          f"({disk.filename})", "kvmsnap needs file-backed disks (qcow2/raw)")
