"""A small client of the QEMU guest agent (qemu-ga), on the clone's private socket.

The agent speaks newline-delimited JSON over a virtio-serial port. Whatever the host
sends before the guest's agent opens the port is lost, so the first exchange is a
``guest-sync`` with a fresh id, repeated until the agent answers with that id (answers to
earlier, lost syncs are skipped); only then are commands sent. One client at a time: the
socket is closed before the shutdown ladder may need it (vm/shutdown.py).
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import StepTimeout, VMError

#: seconds between guest-sync attempts while the agent has not started
SYNC_EVERY = 3.0


class GuestAgent:
    """One connection to a guest agent's host-side socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def wait_ready(self, deadline: float, check: Callable[[], None] = lambda: None) -> None:
        """Until ``deadline`` (monotonic): sync with the agent, then ``guest-ping`` it.
        ``check`` runs between attempts (it raises to give up: the guest failed to boot)."""
        while True:
            check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepTimeout("the guest agent did not answer")
            token = random.randrange(1, 2**31)
            try:
                self._send("guest-sync", {"id": token})
                if self._reply(min(SYNC_EVERY, remaining), token) == token:
                    break
            except (OSError, StepTimeout):
                self.close()  # a fresh connection for the next attempt
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self.execute("guest-ping", timeout=max(1.0, deadline - time.monotonic()))

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = 10.0) -> Any:
        """Run one agent command; its ``return`` value (VMError for an agent error)."""
        self._send(command, arguments)
        return self._reply(timeout)

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run a program in the guest (``guest-exec``, no shell): its exit code, output."""
        started = self.execute("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                              "capture-output": True})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.execute("guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                out = b"".join(base64.b64decode(status.get(k, "")) for k in ("out-data",
                                                                            "err-data"))
                code = status.get("exitcode", 128 + int(status.get("signal", 0)))
                return int(code), out.decode(errors="replace").strip()
            time.sleep(0.5)
        raise StepTimeout(f"{' '.join(argv)} did not finish in the guest within {timeout:g} s")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            sock.connect(str(self.path))
            self._sock, self._buffer = sock, b""
        return self._sock

    def _send(self, command: str, arguments: dict[str, Any] | None) -> None:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._connect().sendall(json.dumps(request).encode() + b"\n")

    def _reply(self, timeout: float, token: int | None = None) -> Any:
        """The next answer (with ``token``: the sync answer carrying it)."""
        deadline = time.monotonic() + timeout
        while True:
            line, _, rest = self._buffer.partition(b"\n")
            if _:
                self._buffer = rest
                answer = _parse(line)
                if answer is None or (token is not None and answer.get("return") != token):
                    continue
                if "error" in answer:
                    raise VMError(f"the guest agent refused: {answer['error'].get('desc')}",
                                  "check the guest agent's version and its allowed commands")
                return answer.get("return")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepTimeout(f"the guest agent did not answer within {timeout:g} s")
            sock = self._connect()
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise OSError("the guest agent's socket closed")
            self._buffer += chunk


def _parse(line: bytes) -> dict[str, Any] | None:
    """One answer; None for noise (a 0xff sync delimiter, a partial line from before)."""
    try:
        answer = json.loads(line.strip(b"\xff").decode(errors="replace") or "null")
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None
