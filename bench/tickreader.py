"""Read the demo guest's ticker ("T\\n" every 10 ms on its ttyS1) and timestamp arrivals.

Run as a separate process (``python tickreader.py SOCKET OUTFILE``) so that neither the GIL
nor the benchmark's own work delays the timestamps. Each chunk received is written to
OUTFILE as ``<time.monotonic()> <ticks in the chunk>``, one line per chunk, flushed at
once. The process ends when QEMU closes the socket or on SIGTERM.

Kept free of imports from ``bench`` and ``kvmsnap_plugin``: it runs as a plain script.
"""

from __future__ import annotations

import signal
import socket
import sys
import time


def main(path: str, out_path: str, connect_timeout: float = 30.0) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deadline = time.monotonic() + connect_timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                print(f"tickreader: cannot connect to {path}", file=sys.stderr)
                return 2
            time.sleep(0.01)
    with sock, open(out_path, "w", buffering=1) as out:
        print(f"# connected {time.monotonic():.6f}", file=out)
        while True:
            chunk = sock.recv(4096)
            now = time.monotonic()
            if not chunk:
                return 0
            ticks = chunk.count(b"T")
            if ticks:
                out.write(f"{now:.6f} {ticks}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
