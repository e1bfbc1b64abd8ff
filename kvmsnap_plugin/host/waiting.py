"""Which program each thread waits for, so that one thread's wait can be ended.

A signal reaches only the main thread. In a run of many VMs each VM runs in a thread of
its own, and the watch over a parent (run/watch.py) must end that VM's step alone: it
ends the program (borg, restic) the VM's thread waits for, as a Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

#: the program each thread waits for (thread id -> PID): a signal reaches only the main
#: thread, so a watch that must end one VM's step in a run of many ends that program
_WAITED: dict[int, int] = {}


@contextlib.contextmanager
def waited_by_this_thread(pid: int) -> Iterator[None]:
    ident = threading.get_ident()
    _WAITED[ident] = pid
    try:
        yield
    finally:
        _WAITED.pop(ident, None)


def interrupt_waited(thread_ident: int) -> None:
    """End (SIGTERM) the program the thread ``thread_ident`` waits for, if any: its wait
    returns, and the thread sees the exception it was sent."""
    pid = _WAITED.get(thread_ident)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
