"""The one client of the QEMU guest agent (qemu-ga): `kvmsnap verify` asks it whether a
booted backup came up, and the clone's shutdown asks it for the guest's network mounts.

The agent speaks newline-delimited JSON over a virtio-serial port; the socket is always a
private one of ours (a clone's or a verify boot's, :mod:`kvmsnap_plugin.vm.clone_argv`),
never the parent's. Whatever the host sends before the guest's agent opens the port is
lost, and the port may still hold half a request or an answer meant for someone else (the
fork copied the guest mid-conversation). So the first exchange is a 0xFF (which makes the
agent drop a half-read request) and a ``guest-sync`` with a fresh id, repeated until the
agent answers with that id (earlier answers and noise are skipped); only then are commands
sent. One client at a time: it is closed before the shutdown ladder may need the socket.
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
#: resets the agent's JSON parser (qemu-ga's delimiter)
SENTINEL = b"\xff"


class GuestAgent:
    """One connection to a guest agent's host-side socket, opened on first use."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout  # connecting, and each exchange unless told otherwise
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
        ``check`` runs between attempts (it raises to give up: the guest failed to boot).
        StepTimeout if the agent never answered."""
        while True:
            check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepTimeout("the guest agent did not answer")
            token = random.randrange(1, 2**31)
            try:
                self._connect().sendall(SENTINEL)
                self._send("guest-sync", {"id": token})
                if self._reply(min(SYNC_EVERY, remaining), token) == token:
                    break
            except (OSError, StepTimeout):
                self.close()  # a fresh connection for the next attempt
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self.execute("guest-ping", timeout=max(1.0, deadline - time.monotonic()))

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run one agent command; its ``return`` value (VMError for an agent error or a
        channel that cannot be used, StepTimeout for no answer)."""
        try:
            self._send(command, arguments)
            return self._reply(self.timeout if timeout is None else timeout)
        except OSError as exc:
            self.close()
            raise VMError(f"the guest agent at {self.path} cannot be reached: {exc}",
                          "is qemu-guest-agent installed and running in the guest?") from None

    def tell(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Send a command that answers nothing (``guest-shutdown``). Keep the client open
        until the guest acts: a virtio-serial port drops what the host sent once the host
        side closes. VMError if the channel cannot be used."""
        try:
            self._send(command, arguments)
        except OSError as exc:
            self.close()
            raise VMError(f"the guest agent at {self.path} cannot be reached: {exc}",
                          "is qemu-guest-agent installed and running in the guest?") from None

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int | None, str, str]:
        """Run a program in the guest (``guest-exec``, no shell): (exit code, stdout,
        stderr); the exit code is None if it has not ended within ``timeout`` (it is left
        running)."""
        started = self.execute("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                              "capture-output": True})
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": started["pid"]})
            if status.get("exited"):
                code = status.get("exitcode", 128 + int(status.get("signal", 0)))
                return int(code), _decoded(status, "out-data"), _decoded(status, "err-data")
            if time.monotonic() >= deadline:
                return None, "", ""
            time.sleep(0.2)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                raise
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
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                answer = _parse(line)
                if answer is None or (token is not None and answer.get("return") != token):
                    continue
                if "error" in answer:
                    raise VMError(f"the guest agent refused: {answer['error'].get('desc')}",
                                  "check the guest agent's version and its allowed commands")
                return answer.get("return")
            self._buffer += self._receive(deadline, timeout)

    def _receive(self, deadline: float, timeout: float) -> bytes:
        while True:
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
            return chunk


def _parse(line: bytes) -> dict[str, Any] | None:
    """One answer; None for noise (a 0xff sync delimiter, a partial line from before)."""
    try:
        answer = json.loads(line.strip(SENTINEL).decode(errors="replace") or "null")
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _decoded(status: dict[str, Any], key: str) -> str:
    return base64.b64decode(status.get(key, "")).decode(errors="replace")
