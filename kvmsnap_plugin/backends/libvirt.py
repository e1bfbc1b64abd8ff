"""A libvirt domain, reached through libvirt-python.

libvirt must keep believing what is true, so every change to the domain's state and disks
goes through libvirt: the pause is ``virDomainSuspend``, the disk snapshot a disk-only,
metadata-less, atomic external snapshot (``snapshotCreateXML``) onto overlays kvmsnap
created beforehand, and the chain is given back with an active ``blockCommit`` into the
frozen image + pivot. Raw QMP snapshots behind libvirt's back leave it with a stale view
("Need a root block node").

Only the RAM snapshot goes through QEMU's monitor (libvirt has no background snapshot):
:class:`DomainMonitor` passes QMP through libvirt (``qemuMonitorCommandWithFiles`` hands
QEMU the state file's descriptor; ``migrate exec:`` would be killed by libvirt's seccomp
sandbox) and delivers QEMU's events with their timestamps.

The clone is a bare QEMU started from the domain's ``/proc/PID/cmdline`` (see
:mod:`kvmsnap_plugin.vm.clone`): libvirt never learns of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from kvmsnap_plugin.backends.libvirt_host import find_qemu_pid, offline_disk
from kvmsnap_plugin.backends.libvirt_xml import (
    disk_by_target,
    domain_disks,
    named_by_target,
    pointed_back,
    snapshot_xml,
)
from kvmsnap_plugin.errors import HostError, StepTimeout, VMError
from kvmsnap_plugin.host import faults, process
from kvmsnap_plugin.model import DEFAULT_LIBVIRT_URI, ForkedDisk, JournalState, Parent
from kvmsnap_plugin.vm.parent import (
    block_disks,
    check_disks,
    check_runstate,
    read_cmdline,
    refuse_unclonable,
)
from kvmsnap_plugin.vm.qmp import Event

log = logging.getLogger(__name__)

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


def find_domain(conn: Any, name: str, uuid: str | None = None) -> Any | None:
    """The domain by UUID if known (a new domain may have taken the name), else by name;
    None if there is none."""
    libvirt = _libvirt()
    try:
        return conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VMError(f"cannot look up domain {name!r}: {exc}") from None


@contextlib.contextmanager
def libvirt_errors(what: str, fix: str | None = None) -> Iterator[None]:
    """libvirt's exceptions as one-line VMErrors saying what was being done."""
    libvirt = _libvirt()
    try:
        yield
    except libvirt.libvirtError as exc:
        raise VMError(f"{what}: {exc}", fix) from None


class DomainMonitor:
    """QMP through libvirt, with QEMU's events (and their timestamps) as they arrive."""

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

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
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

    def events(self) -> list[Event]:
        with self._arrived:
            taken, self._pending = self._pending, []
        return taken

    def wait_event(self, names: str | Iterable[str], timeout: float,
                   match: Callable[[Event], bool] = lambda e: True) -> Event:
        wanted = {names} if isinstance(names, str) else set(names)

        def first() -> Event | None:
            return next((e for e in self._pending if e.name in wanted and match(e)), None)

        with self._arrived:
            event = self._arrived.wait_for(first, timeout)
            if event is None:
                raise StepTimeout(f"no {'/'.join(sorted(wanted))} event within {timeout:g} s")
            self._pending.remove(event)
            return event


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
            libvirt = _libvirt()
            state, _reason = self.dom.state()
            if state == libvirt.VIR_DOMAIN_SHUTOFF:
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
        argv = read_cmdline(self.pid)
        refuse_unclonable(argv)
        check_runstate(self.monitor)
        version = self.monitor.execute("query-version")["qemu"]
        disks = named_by_target(block_disks(self.monitor.execute("query-block")),
                                self.dom.XMLDesc(0))
        check_disks(self.domain, disks)
        return Parent(None, self.pid, self.domain, tuple(argv),
                      (version["major"], version["minor"], version["micro"]), disks)

    def _describe_offline(self) -> Parent:
        """A shut-off domain: its images, from its persistent XML, are consistent as they
        are (the guest shut down, or was never started); nothing to fork."""
        # An empty CD drive has no source; a writable disk without a file (a pool volume,
        # a network disk) stays in, to be refused by name below rather than skipped.
        disks = tuple(offline_disk(d) for d in
                      domain_disks(self.dom.XMLDesc(_libvirt().VIR_DOMAIN_XML_INACTIVE))
                      if d.source or not d.read_only)
        check_disks(self.domain, disks)
        log.info("%s is shut off: backing up its disk images as they are, without a fork",
                 self.domain)
        return Parent(None, 0, self.domain, (), (0, 0, 0), disks, offline=True)

    # -- the fork ---------------------------------------------------------------------------
    def pause(self) -> None:
        with libvirt_errors("pausing the domain"):
            self.dom.suspend()

    def resume(self) -> None:
        with libvirt_errors("resuming the domain"):
            self.dom.resume()

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """Nothing: libvirt opens the overlays during the snapshot."""

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """Nothing: an overlay that is no disk's layer is not open."""

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        libvirt = _libvirt()
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        with libvirt_errors("the disk snapshot through libvirt failed",
                            "see the message; the domain was resumed on its own chain"):
            xml = snapshot_xml(planned, domain_disks(self.dom.XMLDesc(0)), name)
            self.dom.snapshotCreateXML(xml, flags)

    def active_overlays(self, planned: Sequence[ForkedDisk]) -> list[ForkedDisk]:
        with libvirt_errors(f"reading the disks of {self.domain}"):
            tops = {d.source for d in domain_disks(self.dom.XMLDesc(0))}
        return [d for d in planned if str(d.parent_overlay) in tops]

    # -- the commit back --------------------------------------------------------------------
    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        """Like ``virsh blockcommit --active --pivot --base FROZEN``: without the base,
        libvirt would merge into the *bottom* of the chain."""
        libvirt = _libvirt()
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

    def _pivot_when_ready(self, target: str, timeout: float) -> int:
        """Pivot once libvirt has seen the job ready (it refuses before: retried)."""
        libvirt = _libvirt()
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
    def point_config_back(self, disks: Sequence[ForkedDisk]) -> list[str]:
        """A shut-off domain whose persistent XML still names our overlay (libvirt writes
        an external snapshot into it) would next start from a deleted file."""
        libvirt = _libvirt()
        with libvirt_errors(f"redefining {self.domain} on its own images"):
            if self.dom is None or not self.dom.isPersistent():
                return []
            xml, changed = pointed_back(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                                        disks)
            if changed:
                self.conn.defineXML(xml)
        return changed


def reopen(state: JournalState) -> LibvirtBackend:
    """The domain a journal names, found by its UUID. Opening it raises if libvirt cannot
    be reached: an overlay may be a running domain's active layer, and only libvirt knows."""
    return LibvirtBackend(state.domain or "", state.libvirt_uri, state.uuid or None,
                          must_exist=False)
