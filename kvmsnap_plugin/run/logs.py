"""Where log lines go, and the VM each one is about.

On a terminal: ``kvmsnap: web: message``. Under systemd (stderr is the journal stream): the
journal itself (python3-systemd's JournalHandler, with the VM as field KVMSNAP_VM), else
syslog's /dev/log, else stderr with syslog priority prefixes. Anywhere else (cron, a pipe, a
file): stderr with a timestamp, the level and the VM on every line. ``--log`` or
``KVMSNAP_LOG`` forces one of them.

The VM is a context variable, set by the run around each VM's backup (:func:`vm_context`),
so VMs backed up concurrently (one thread each) name their own lines.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from kvmsnap_plugin.host.secrets import MaskingFormatter

DESTINATIONS = ("auto", "terminal", "stderr", "journal", "syslog")
SYSLOG_SOCKET = Path("/dev/log")

current_vm: ContextVar[str] = ContextVar("kvmsnap_vm", default="")


@contextlib.contextmanager
def vm_context(name: str) -> Iterator[None]:
    """Every line logged inside (in this thread or task) names VM ``name``."""
    token = current_vm.set(name)
    try:
        yield
    finally:
        current_vm.reset(token)


def log_as_vm(name: str) -> None:
    """Inside :func:`vm_context` (which restores what was before), lines name ``name`` from
    now on: the VM's own name, once QEMU has told it. Outside one, nothing: a name set
    there would outlive the VM (a pipeline called directly, as the tests do)."""
    if current_vm.get():
        current_vm.set(name)


class VmFilter(logging.Filter):
    """Adds ``vm`` ("-" outside a VM), ``vm_prefix`` ("web: " or "") and ``KVMSNAP_VM`` (a
    journal field) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        vm = current_vm.get()
        record.vm = vm or "-"
        record.vm_prefix = f"{vm}: " if vm else ""
        if vm:
            record.KVMSNAP_VM = vm
        return True


class SdPrefixFormatter(MaskingFormatter):
    """``<3>message``: systemd reads the priority from stderr lines that start so."""

    PRIORITIES = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelname, 6)}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """systemd connected stderr to the journal (JOURNAL_STREAM names that very stream)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def choose(forced: str | None = None) -> str:
    """The destination: ``forced`` (or KVMSNAP_LOG) unless "auto"; else from stderr."""
    wanted = forced or os.environ.get("KVMSNAP_LOG") or "auto"
    if wanted != "auto":
        return wanted
    if stderr_is_journal():
        return "journal"
    return "terminal" if sys.stderr.isatty() else "stderr"


def make_handler(destination: str) -> logging.Handler:
    """A handler for ``destination``, falling back journal -> syslog -> stderr when the
    host lacks one."""
    if destination == "journal":
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]
        except ImportError:
            destination = "syslog"
        else:
            handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="kvmsnap")
            handler.setFormatter(MaskingFormatter("%(vm_prefix)s%(message)s"))
            return handler
    if destination == "syslog" and SYSLOG_SOCKET.exists():
        try:
            handler = logging.handlers.SysLogHandler(str(SYSLOG_SOCKET))
        except OSError:  # a socket nobody listens on: stderr below
            pass
        else:
            handler.setFormatter(MaskingFormatter(
                "kvmsnap[%(process)d]: %(vm_prefix)s%(message)s"))
            return handler
    handler = logging.StreamHandler(sys.stderr)
    if destination in ("journal", "syslog"):  # neither there: stderr, which journald reads
        handler.setFormatter(SdPrefixFormatter("kvmsnap: %(vm_prefix)s%(message)s"))
    elif destination == "terminal":
        handler.setFormatter(MaskingFormatter("kvmsnap: %(vm_prefix)s%(message)s"))
    else:
        handler.setFormatter(MaskingFormatter(
            "%(asctime)s kvmsnap[%(process)d] %(levelname)s vm=%(vm)s: %(message)s",
            "%Y-%m-%dT%H:%M:%S%z"))
    return handler


def log_handler(forced: str | None = None) -> logging.Handler:
    """The handler ``kvmsnap`` logs through, with the VM filter in place."""
    handler = make_handler(choose(forced))
    handler.addFilter(VmFilter())
    return handler
