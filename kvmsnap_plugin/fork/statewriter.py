"""The RAM state writer: a tiny process between QEMU's migration stream and the state file.

``python -m kvmsnap_plugin.fork.statewriter`` copies its stdin (the pipe QEMU writes the RAM
snapshot into) to its stdout (the 0600 state file). If writing fails - a full disk, an I/O
error - it keeps reading and discarding, so QEMU's snapshot still ends normally, and exits
with code 1 and the reason on stderr. It is a process of its own, in its own session, so it
outlives a kvmsnap that is killed mid-snapshot: QEMU 7.2 hangs (guest and monitor) when a
background snapshot's write fails, which is what a reader dying with kvmsnap would cause.
"""

from __future__ import annotations

import os
import sys

CHUNK = 1 << 20


def copy(source: int, dest: int) -> str | None:
    """Copy until EOF; return why writing stopped, if it did (reading never stops)."""
    error = None
    while chunk := os.read(source, CHUNK):
        if error is None:
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dest, view):]
            except OSError as exc:
                error = f"{exc.strerror or exc}"
    return error


def main() -> int:
    if len(sys.argv) > 1:  # the ready fd: kvmsnap pauses the guest only after this byte
        ready = int(sys.argv[1])
        os.write(ready, b"1")
        os.close(ready)
    error = copy(sys.stdin.fileno(), sys.stdout.fileno())
    if error:
        print(error, file=sys.stderr)
        return 1
    os.fsync(sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
