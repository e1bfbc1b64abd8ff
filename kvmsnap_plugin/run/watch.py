"""Watching the parent while the backup's long steps run.

After the fork the parent runs on its overlay. If that overlay's filesystem fills up, QEMU
stops the guest on the I/O error and holds the failed write until it is resumed. The run
must not leave it stopped for as long as a clone's shutdown or an archiver takes (minutes,
hours): while those steps run, a thread asks the parent every few seconds, and on an I/O
error interrupts them. The run then unwinds as after any failure: the parent's writes are
committed back into its images (which have their space) and the guest is resumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Protocol

from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host.waiting import interrupt_waited

log = logging.getLogger(__name__)

#: how often the parent is asked (a query-block over QMP: cheap)
EVERY = 2.0


class Checkable(Protocol):
    def check_healthy(self) -> None:
        """Raise when the parent stopped on an I/O error."""


@contextlib.contextmanager
def watching(parent: Checkable | None, every: float = EVERY) -> Iterator[None]:
    """Run the block while a thread checks ``parent`` every ``every`` seconds; an unhealthy
    parent ends the block with the check's error. While the block runs, nothing else may use
    the parent's monitor (its QMP session is not thread-safe): the watch is its only user."""
    if parent is None:  # an offline backup: no running parent to watch
        yield
        return
    found: list[KvmsnapError] = []
    active = threading.Lock()  # held while the block runs: the only window to interrupt it
    active.acquire()
    stop = threading.Event()
    watched = threading.current_thread()  # a VM of a run of many runs in its own thread
    thread = threading.Thread(target=_poll, args=(parent, every, stop, active, found, watched),
                              name="kvmsnap-parent-watch", daemon=True)
    thread.start()
    try:
        try:
            with _interruptible(watched):
                yield
        finally:
            active.release()
            stop.set()
            thread.join()
    except KeyboardInterrupt:
        if found:
            raise found[0] from None  # our interrupt, not the user's
        raise
    if found:
        raise found[0]


@contextlib.contextmanager
def _interruptible(watched: threading.Thread) -> Iterator[None]:
    """The main thread takes SIGINT as KeyboardInterrupt while the block runs.

    A kvmsnap started with SIGINT ignored (a background job of a non-interactive shell,
    ``cmd &`` in a script) would never see the watch's SIGINT: found by a test, the
    parent stayed stopped on its I/O error for the archiver's whole run. So an ignored
    SIGINT is taken for the block and ignored again after it (an outside SIGINT in that
    time unwinds the run as a Ctrl-C does: the writes committed back, the VM resumed)."""
    if (watched is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _poll(parent: Checkable, every: float, stop: threading.Event, active: threading.Lock,
          found: list[KvmsnapError], watched: threading.Thread) -> None:
    while not stop.wait(every):
        try:
            parent.check_healthy()
        except KvmsnapError as exc:
            found.append(exc)
            if not active.acquire(blocking=False):  # the block still runs: end it now
                log.error("%s", exc)
                interrupt_thread(watched)
            else:
                active.release()
            return
        except Exception as exc:  # the monitor went away: the next step will say why
            log.debug("watching the parent: %s", exc)
            return


def interrupt_thread(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` so that it unwinds its cleanup.

    The main thread gets a real SIGINT: it also ends a blocking wait (borg quietly running
    in subprocess.run), which a simulated one would not. Another thread (one VM of a run
    of many) cannot be signalled alone (the SIGINT would interrupt the whole run, every
    VM): it gets the exception at its next Python step, at once when the program it waits
    for (borg, restic) is ended, as a Ctrl-C would end it."""
    if thread is threading.main_thread():
        signal.pthread_kill(thread.ident or 0, signal.SIGINT)
    elif thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(KeyboardInterrupt))
        interrupt_waited(thread.ident)  # a program it waits for ends: it sees it
