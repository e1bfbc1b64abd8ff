"""A QEMU process kvmsnap started, with its QMP session, as a context manager.

Modelled on ``qemu.machine.QEMUMachine``: leaving the ``with`` block always ends the VM
through a soft -> hard ladder (ACPI power button, QMP ``quit``, SIGTERM, SIGKILL) and then
removes the QMP socket, whatever happened inside the block. Both the demo VMs and the
clones run in one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from kvmsnap_plugin.errors import StepTimeout, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.vm.qmp import QmpSession

log = logging.getLogger(__name__)


class Machine:
    """One QEMU process and its QMP session."""

    def __init__(self, argv: Sequence[str], *, qmp_path: Path, name: str = "vm",
                 console_log: Path | None = None, stderr_log: Path | None = None,
                 pass_fds: Sequence[int] = (),
                 on_start: Callable[[int], None] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.qmp_path = qmp_path
        self.name = name
        self.console_log = console_log
        self.stderr_log = stderr_log or qmp_path.with_name(f"{name}.stderr")
        self.pass_fds = tuple(pass_fds)
        self.on_start = on_start  # told the PID at once (the journal records it)
        self.env = env  # QEMU's whole environment (None: kvmsnap's own, a demo VM's)
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpSession | None = None
        #: how the VM ended: "guest", "powerdown", "quit", "terminate", "kill"
        self.ended_by: str | None = None

    # -- life -------------------------------------------------------------------------
    def __enter__(self) -> Machine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self, connect_timeout: float = 30.0) -> None:
        with open(self.stderr_log, "wb") as err:
            self.proc = self._spawn(err)
        if self.on_start:
            self.on_start(self.proc.pid)
        deadline = time.monotonic() + connect_timeout
        while not self.qmp_path.exists():
            self._check_alive("while starting")
            if time.monotonic() > deadline:
                self.shutdown()
                raise StepTimeout(f"{self.name}: QEMU made no QMP socket in {connect_timeout} s")
            time.sleep(0.02)
        self._qmp = QmpSession(self.qmp_path, name=self.name).connect(
            max(1.0, deadline - time.monotonic()))

    def _spawn(self, stderr: IO[bytes], executable: str | None = None) -> subprocess.Popen[bytes]:
        """Start QEMU (a clone runs its parent's binary: ``executable``, see clone.py)."""
        return process.spawn(self.argv, stderr=stderr, pass_fds=self.pass_fds, env=self.env,
                             inherit_env=self.env is None, executable=executable)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def qmp(self) -> QmpSession:
        if self._qmp is None:
            raise VMError(f"{self.name} has no QMP session", "start the machine first")
        return self._qmp

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self) -> str:
        try:
            lines = self.stderr_log.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        return lines[-1] if lines else ""

    def _check_alive(self, doing: str) -> None:
        if not self.running():
            code = self.proc.returncode if self.proc else None
            raise VMError(f"{self.name}: QEMU exited (code {code}) {doing}: {self.stderr_tail()}",
                          "see the QEMU error above")

    # -- console ----------------------------------------------------------------------
    def console(self) -> str:
        if self.console_log is None:
            return ""
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, pattern: str, timeout: float, *, start: int = 0) -> re.Match[str]:
        """Wait until the serial console shows ``pattern`` (a regex) at or after ``start``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console(), start)
            if match:
                return match
            if not self.running():
                raise VMError(f"{self.name} exited before its console showed {pattern!r}: "
                              f"{self.stderr_tail()}", "see the guest console log")
            if time.monotonic() > deadline:
                raise StepTimeout(f"{self.name}: console did not show {pattern!r} in {timeout} s")
            time.sleep(0.05)

    # -- ending -----------------------------------------------------------------------
    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def shutdown(self, powerdown_timeout: float = 20.0, quit_timeout: float = 5.0) -> str:
        """End the VM, gently first. Returns (and records) which step ended it."""
        try:
            if self.ended_by is None:
                self.ended_by = self._ladder(powerdown_timeout, quit_timeout)
        finally:
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            self.qmp_path.unlink(missing_ok=True)
        log.debug("%s ended by %s", self.name, self.ended_by)
        return self.ended_by

    def _ladder(self, powerdown_timeout: float, quit_timeout: float) -> str:
        if self.proc is None:
            return "never-started"
        if not self.running():
            return "guest"
        for step, command, wait in (("powerdown", "system_powerdown", powerdown_timeout),
                                    ("quit", "quit", quit_timeout)):
            if wait <= 0 or self._qmp is None:
                continue
            try:
                self._qmp.execute(command, timeout=5)
            except Exception as exc:  # the VM may be going away already
                log.debug("%s: %s: %s", self.name, command, exc)
            if self.wait_exit(wait):
                return step
        return process.end(self.proc, grace=5)
