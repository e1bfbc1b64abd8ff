"""A small synchronous session over :mod:`qemu.qmp`.

kvmsnap is a synchronous program; qemu.qmp is asyncio. :class:`QmpSession` owns a private
event loop and turns each call into a bounded ``run_until_complete``. Events are kept in
arrival order with QEMU's own timestamps, so the fork can measure STOP -> RESUME exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from kvmsnap_plugin.errors import StepTimeout, VMError

log = logging.getLogger(__name__)

#: what asyncio says when a queued stop ends run_until_complete before its future
STALE_STOP = "Event loop stopped before Future completed."


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any]
    timestamp: float  # seconds since the epoch, as QEMU stamped it

    @classmethod
    def from_message(cls, msg: Any) -> Event:
        stamp = msg.get("timestamp", {})
        when = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        return cls(msg["event"], dict(msg.get("data", {})), when)


class Monitor(Protocol):
    """QEMU's monitor: :class:`~kvmsnap_plugin.vm.qmp.QmpSession` for a bare QEMU,
    :class:`~kvmsnap_plugin.backends.libvirt.DomainMonitor` (QMP through libvirt) for a domain."""

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        """Run a QMP command; its ``return`` value. Raises VMError if QEMU refuses it."""

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under ``name`` (QMP ``getfd``)."""

    def add_fd(self, fd: int, opaque: str) -> int:
        """Put an open file descriptor into a new fdset (QMP ``add-fd``); the set's id."""

    def runstate(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``finish-migrate``, ...)."""

    def events(self) -> list[Event]:
        """The events received and not consumed yet, oldest first (and forget them)."""

    def wait_event(self, names: str | Iterable[str], timeout: float,
                   match: Callable[[Event], bool] = ...) -> Event:
        """The first event named in ``names`` that ``match`` accepts; StepTimeout if none."""



@contextlib.contextmanager
def _connected(path: Path, timeout: float) -> Iterator[tuple[socket.socket, int]]:
    """A short connection to a unix socket, and the PID of the process listening on it
    (the kernel hands a client its listener's credentials at ``connect``, before any
    ``accept``, so this works while another client holds a QMP socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise VMError(f"no such QMP socket: {path}",
                          "start QEMU with -qmp unix:PATH,server=on,wait=off") from None
        except BlockingIOError:  # its queue is full: one client holds it, others wait
            raise VMError(f"{path} is busy (its queue of waiting clients is full)",
                          "wait for the other QMP clients to finish, or pass --pid") from None
        except OSError as exc:
            raise VMError(f"cannot connect to {path}: {exc.strerror or exc}",
                          "is the VM running, and is the path its QMP socket?") from None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        yield sock, struct.unpack("3i", creds)[0]


def peer_pid(path: Path, timeout: float = 5.0) -> int:
    """PID of the process serving a QMP unix socket, checking that it speaks QMP.

    A QMP socket serves one client at a time; this short connection is closed before the
    real session starts.
    """
    with _connected(path, timeout) as (sock, pid):
        try:
            greeting = sock.recv(4096)
        except TimeoutError:
            raise VMError(f"{path} sent no QMP greeting within {timeout:g} s",
                          "the socket is busy (another QMP client?) or is not QMP") from None
    if not greeting.startswith(b'{"QMP"'):
        raise VMError(f"{path} is not a QMP socket (it said {greeting[:40]!r})",
                      "pass the VM's QMP socket (-qmp unix:PATH,server=on), not its monitor "
                      "or serial socket")
    return pid


def socket_owner(path: Path, timeout: float = 5.0) -> int:
    """The PID of the process listening on the unix socket ``path``.

    Found in /proc without connecting where it can be: a QMP socket serves one client at a
    time, and a connection QEMU has to accept and drop is a detour for the real one. Else
    by connecting: the kernel hands a client its listener's credentials at ``connect``,
    before any ``accept``, so this works while another client holds the socket.
    """
    if not path.exists():
        raise VMError(f"no such QMP socket: {path}",
                      "start QEMU with -qmp unix:PATH,server=on,wait=off")
    pid = _listener_from_proc(path)
    if pid:
        return pid
    with _connected(path, timeout) as (_, owner):
        return owner


def _listener_from_proc(path: Path) -> int | None:
    """The one process listening on the socket file ``path``: the socket's inode in
    /proc/net/unix (by the file it is bound to, however reached: a symlink, a bind mount),
    then the process holding it. None if not found (another network namespace) or if
    several processes hold it (only the listener's own credentials tell then)."""
    target = path.stat()
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split(None, 7)  # the path, last, may hold spaces
        if len(fields) < 8 or not int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            continue
        with contextlib.suppress(OSError):
            bound = os.stat(fields[7])
            if (bound.st_dev, bound.st_ino) == (target.st_dev, target.st_ino):
                inodes.add(f"socket:[{fields[6]}]")
    pids = [name for name in os.listdir("/proc") if name.isdigit()] if inodes else []
    holders = {int(pid) for pid in pids if inodes & _open_files(pid)}
    return holders.pop() if len(holders) == 1 else None


def _open_files(pid: str) -> set[str]:
    """What process ``pid``'s descriptors point at (as far as it can be seen: it may end,
    and another user's are hidden unless we are root)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


class QmpSession:
    """A QMP connection, as a context manager. Commands raise :class:`VMError`."""

    def __init__(self, path: Path | str, *, name: str = "kvmsnap",
                 command_timeout: float = 30.0) -> None:
        self.path = str(path)
        self.command_timeout = command_timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._pending: list[Event] = []

    # -- connection -------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> QmpSession:
        """Connect, retrying while the socket does not exist yet (QEMU still starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sync(self._client.connect(self.path), max(0.1, deadline - time.monotonic()))
                return self
            except (TimeoutError, ConnectError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise VMError(f"cannot open a QMP session on {self.path}: {exc}",
                                  "check that QEMU runs and that no other client holds "
                                  "the socket") from None
                time.sleep(0.05)

    def close(self) -> None:
        try:
            self._sync(self._client.disconnect(), 5.0)
        except Exception as exc:  # closing must never mask the real error
            log.debug("QMP disconnect: %s", exc)
        finally:
            self._loop.close()

    def __enter__(self) -> QmpSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                *, timeout: float | None = None) -> Any:
        log.debug("qmp %s %s", command, json.dumps(arguments or {}))
        try:
            return self._sync(self._client.execute(command, arguments),
                              timeout or self.command_timeout)
        except ExecuteError as exc:
            raise VMError(f"QMP {command} failed: {exc.error.error.desc}",
                          "the VM refused the command; see the message") from None
        except TimeoutError:
            raise StepTimeout(f"QMP {command} got no answer within "
                              f"{timeout or self.command_timeout:g} s") from None
        except (QMPError, OSError, EOFError) as exc:
            raise VMError(f"QMP connection lost during {command}: {exc}",
                          "the VM may have exited; check that it is still running") from None

    def send_fd(self, fd: int, name: str) -> None:
        """Hand an open file descriptor to QEMU under ``name`` (QMP ``getfd``)."""
        self._client.send_fd_scm(fd)
        self.execute("getfd", {"fdname": name})

    def add_fd(self, fd: int, opaque: str) -> int:
        """Put an open file descriptor into a new fdset (QMP ``add-fd``); the set's id."""
        self._client.send_fd_scm(fd)
        return int(self.execute("add-fd", {"opaque": opaque})["fdset-id"])

    def hmp(self, command_line: str) -> str:
        return self.execute("human-monitor-command", {"command-line": command_line})

    def runstate(self) -> str:
        return self.execute("query-status")["status"]

    # -- events -----------------------------------------------------------------------
    def events(self) -> list[Event]:
        """All events received so far and not yet consumed, oldest first."""
        self._pump(0)
        taken, self._pending = self._pending, []
        return taken

    def wait_event(self, names: str | Iterable[str], timeout: float,
                   match: Callable[[Event], bool] = lambda e: True) -> Event:
        """Wait for the first event named in ``names`` that ``match`` accepts.

        Events that do not match stay queued for later waits.
        """
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._pending):
                if event.name in wanted and match(event):
                    del self._pending[i]
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepTimeout(f"no {'/'.join(sorted(wanted))} event within {timeout:g} s")
            self._pump(remaining)

    def _pump(self, timeout: float) -> None:
        """Move events from qemu.qmp's queue to ours, waiting up to ``timeout`` for one."""
        listener = self._client.events
        if listener.empty() and timeout > 0:
            try:
                msg = self._sync(listener.get(), timeout)
                self._pending.append(Event.from_message(msg))
            except TimeoutError:
                return
            except (QMPError, OSError, EOFError):
                raise VMError("QMP connection lost while waiting for an event",
                              "the VM may have exited") from None
        else:
            self._sync(asyncio.sleep(0), 1.0)
        for msg in listener.clear():
            self._pending.append(Event.from_message(msg))

    def _sync(self, awaitable: Any, timeout: float) -> Any:
        future = asyncio.ensure_future(asyncio.wait_for(awaitable, timeout), loop=self._loop)
        for _ in range(3):
            try:
                return self._loop.run_until_complete(future)
            except RuntimeError as exc:
                # An earlier call interrupted by a signal (SIGTERM, Ctrl-C) after its future
                # completed leaves that future's done-callback, a loop.stop(), queued: it
                # ends this run early. Run the loop again; the stale stop is spent.
                if future.done() or str(exc) != STALE_STOP:
                    raise
        return self._loop.run_until_complete(future)


# -- descriptors for migrations ---------------------------------------------------------------
@dataclass(frozen=True)
class StateChannel:
    """A descriptor handed to QEMU for a migration to or from it, and the URI naming it."""

    uri: str
    fdset: int | None = None  # ``file:`` URIs: the fdset holding QEMU's copy until removed


def file_migration_supported(monitor: Monitor) -> bool:
    """Does this QEMU migrate to and from ``file:`` URIs (QEMU 8.2 on)?

    Asked of its QMP schema, not its version: the transport enum (``MigrationAddressType``:
    socket, exec, rdma, file) came with the ``file`` transport. 7.2 has none.
    """
    schema = monitor.execute("query-qmp-schema")
    return any(entry.get("meta-type") == "enum"
               and {"socket", "exec", "file"} <= set(entry.get("values", ()))
               for entry in schema)


def hand_state_fd(monitor: Monitor, fd: int, name: str, *, file_uris: bool) -> StateChannel:
    """Hand QEMU ``fd`` for a migration; the URI to give ``migrate``/``migrate-incoming``.

    A regular file goes as ``file:/dev/fdset/N`` where QEMU has ``file:`` URIs: ``fd:`` to
    a file is deprecated since QEMU 9.1 (a warning on its stderr, an error later). Pipes and
    sockets stay ``fd:NAME``: ``file:`` truncates its target (ftruncate fails on a pipe), and
    ``fd:`` keeps them (QEMU 9.2 on warns only for other descriptors). ``name`` is also the
    fdset's opaque tag: a set a killed run left behind is removed first.
    """
    if not (file_uris and stat.S_ISREG(os.fstat(fd).st_mode)):
        monitor.send_fd(fd, name)
        return StateChannel(f"fd:{name}")
    for stale in monitor.execute("query-fdsets"):
        if any(entry.get("opaque") == name for entry in stale.get("fds", ())):
            release_state_fd(monitor, StateChannel("", stale["fdset-id"]))
    fdset = monitor.add_fd(fd, name)
    return StateChannel(f"file:/dev/fdset/{fdset}", fdset)


def release_state_fd(monitor: Monitor, channel: StateChannel) -> None:
    """Close QEMU's copy of a ``file:`` channel's descriptor; never raises.

    An fdset outlives the migration while a QMP client is connected: without this a
    long-lived parent would hold every deleted RAM state file's space open.
    """
    if channel.fdset is None:
        return
    try:
        monitor.execute("remove-fd", {"fdset-id": channel.fdset})
    except (VMError, StepTimeout) as exc:
        log.warning("could not remove fdset %d from QEMU: %s", channel.fdset, exc)
