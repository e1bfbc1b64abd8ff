"""libvirt-python, loaded once with its event loop, and QMP through libvirt.

:class:`DomainMonitor` passes QMP through libvirt (``qemuMonitorCommandWithFiles`` hands
QEMU the state file's descriptor, for ``getfd`` or ``add-fd``; ``migrate exec:`` would be
killed by libvirt's seccomp sandbox) and delivers QEMU's events with their timestamps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from kvmsnap_plugin.errors import HostError, StepTimeout, VMError
from kvmsnap_plugin.vm.qmp import Event

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_started = False


def libvirt_module() -> Any:
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


@contextlib.contextmanager
def libvirt_errors(what: str, fix: str | None = None) -> Iterator[None]:
    """libvirt's exceptions as one-line VMErrors saying what was being done."""
    libvirt = libvirt_module()
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

    def add_fd(self, fd: int, opaque: str) -> int:
        # No fdset-id: QEMU picks a free one, so libvirt's own sets are never touched.
        return int(self._qmp("add-fd", {"opaque": opaque}, (fd,))["fdset-id"])

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
