"""A small client for the QEMU guest agent (qemu-ga), over its virtio-serial socket.

The clone's agent socket is its own (:mod:`kvmsnap_plugin.vm.clone_argv`); the parent's is
never used. The protocol is one JSON object a line; ``guest-sync-delimited`` first, since a
virtio-serial port may still hold an answer meant for someone else (the fork copied the
guest mid-conversation): everything up to the 0xFF sentinel is thrown away.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import VMError

SENTINEL = b"\xff"


class GuestAgent:
    """One conversation with a guest agent; a closed agent raises VMError on every call."""

    def __init__(self, socket_path: Path, timeout: float = 5.0) -> None:
        self._buffer = b""
        self._channel = socket.socket(socket.AF_UNIX)
        self._channel.settimeout(timeout)
        try:
            self._channel.connect(str(socket_path))
            self._sync()
        except (OSError, VMError) as exc:
            self._channel.close()
            raise VMError(f"the guest agent at {socket_path} does not answer: {exc}",
                          "is qemu-guest-agent installed and running in the guest?") from exc

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one agent command; its ``return`` value (VMError on an ``error``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        answer = self._read_answer()
        if "error" in answer:
            raise VMError(f"guest agent {command}: {answer['error'].get('desc', answer)}")
        return answer.get("return")

    def run(self, argv: list[str], timeout: float) -> tuple[int | None, str, str]:
        """Run a program in the guest; (exit code, stdout, stderr). The exit code is None
        if it has not ended after ``timeout`` seconds (it is left running)."""
        pid = self.execute("guest-exec", {"path": argv[0], "arg": argv[1:],
                                          "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return (status.get("exitcode", -1), _decoded(status, "out-data"),
                        _decoded(status, "err-data"))
            if time.monotonic() >= deadline:
                return None, "", ""
            time.sleep(0.1)

    def _sync(self) -> None:
        token = random.randrange(1, 2**31)
        self._channel.sendall(SENTINEL)  # ends a half-sent request the agent may hold
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        while True:
            data = self._channel.recv(4096)
            if not data:
                raise VMError("the guest agent closed the channel")
            self._buffer += data
            if SENTINEL in self._buffer:
                self._buffer = self._buffer.split(SENTINEL)[-1]
                break
        while self._read_answer().get("return") != token:
            pass

    def _send(self, request: dict[str, Any]) -> None:
        self._channel.sendall(json.dumps(request).encode() + b"\n")

    def _read_answer(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            data = self._channel.recv(65536)
            if not data:
                raise VMError("the guest agent closed the channel")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise VMError(f"the guest agent sent garbage: {line[:80]!r}") from exc
        return answer if isinstance(answer, dict) else {}


def _decoded(status: dict[str, Any], key: str) -> str:
    return base64.b64decode(status.get(key, "")).decode(errors="replace")
