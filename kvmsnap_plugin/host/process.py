"""The one place that starts and ends programs.

Rules, as in borgmatic's execute.py: argv lists only (never a shell), every call has a
timeout, secrets travel only in the environment and are masked wherever a command line or
its output is logged. Long-lived programs (QEMU, qemu-storage-daemon) are started with
:func:`spawn` and owned by a context manager elsewhere; kvmsnap only ever signals PIDs it
started itself, and always through :func:`end`.

:func:`run` drives a program through :mod:`subprocess`; :class:`ShProgram` drives one
through the ``sh`` library (the product owner's choice for restic). Both describe, mask,
time out and fail through the same :class:`Call`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import HostError, ProcessError
from kvmsnap_plugin.host.secrets import mask, secret_values, shown_command
from kvmsnap_plugin.host.waiting import waited_by_this_thread

log = logging.getLogger(__name__)

#: how long a SIGKILLed process may take to go
KILL_WAIT = 60.0

#: the whole environment of QEMU-family programs (``inherit_env=False``): no secret of ours
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

#: Every PID spawned by this process, so tests can prove nothing survives.
SPAWNED_PIDS: list[int] = []


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


# -- masking (what is secret, and how it is hidden: host/secrets.py) --------------------------
def describe(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A loggable, masked rendering of a command line."""
    return shown_command(argv, secret_values(env))


def child_env(env: Mapping[str, str] | None, inherit: bool = True) -> dict[str, str]:
    merged = dict(os.environ) if inherit else {}
    merged.update(env or {})
    # Programs we parse must speak plain C-locale English.
    merged.setdefault("LC_ALL", "C.UTF-8")
    return merged


def find_program(name: str, package: str | None = None) -> str:
    """Absolute path of ``name``: our venv's bin dir first (borg, borgmatic), then PATH."""
    venv_bin = Path(sys.executable).parent
    candidate = venv_bin / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found:
        return found
    fix = f"apt-get install {package}" if package else f"install {name}"
    raise HostError(f"program not found: {name}", fix)


# -- one call: how it is shown, how it fails ---------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One run of a program: its argv, the secrets to mask, its time limit."""

    argv: tuple[str, ...]
    secrets: tuple[str, ...]
    timeout: float

    @classmethod
    def of(cls, argv: Iterable[object], secrets: Iterable[str], timeout: float) -> Call:
        return cls(tuple(str(a) for a in argv), tuple(secrets), timeout)

    @property
    def shown(self) -> str:
        """The command line as it may be logged (secrets masked)."""
        return shown_command(self.argv, self.secrets)

    def result(self, returncode: int, stdout: str, stderr: bytes) -> Result:
        return Result(self.argv, returncode, stdout,
                      mask(stderr.decode(errors="replace"), self.secrets))

    def timed_out(self) -> ProcessError:
        return ProcessError(f"{Path(self.argv[0]).name} did not finish within "
                            f"{self.timeout:g} s: {self.shown}",
                            "raise the timeout, or check why the program hangs")

    def failed(self, returncode: int, stderr: bytes) -> ProcessError:
        text = mask(stderr.decode(errors="replace"), self.secrets)
        last = text.strip().splitlines()[-1:] or ["(no error output)"]
        return ProcessError(f"{Path(self.argv[0]).name} failed with exit code "
                            f"{returncode}: {last[0]}",
                            f"run it by hand to see more: {self.shown}",
                            returncode=returncode, stderr=text)


# -- starting --------------------------------------------------------------------------------
def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input: bytes | None = None,
    ok_codes: Iterable[int] = (0,),
    pass_fds: Sequence[int] = (),
    stdout: int | None = subprocess.PIPE,
    cwd: os.PathLike[str] | str | None = None, inherit_env: bool = True,
) -> Result:
    """Run a program to completion; raise :class:`ProcessError` on failure or timeout."""
    call = Call.of(argv, secret_values(env), timeout)
    log.debug("run: %s", call.shown)
    try:
        # subprocess.run's own steps, with the program known to waiting.interrupt_waited()
        with subprocess.Popen(call.argv, stdin=subprocess.PIPE if input is not None else None,
                              stdout=stdout, stderr=subprocess.PIPE,
                              env=child_env(env, inherit_env), pass_fds=tuple(pass_fds),
                              cwd=cwd) as proc, waited_by_this_thread(proc.pid):
            try:
                out_bytes, err_bytes = proc.communicate(input, timeout=timeout)
            except BaseException:  # a timeout, Ctrl-C: never leave it running
                proc.kill()
                proc.wait()
                raise
    except FileNotFoundError as exc:
        raise HostError(f"program not found: {call.argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise call.timed_out() from exc
    if check and proc.returncode not in set(ok_codes):
        raise call.failed(proc.returncode, err_bytes)
    out = out_bytes.decode(errors="replace") if out_bytes is not None else ""
    return call.result(proc.returncode, out, err_bytes)


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: int | object = subprocess.DEVNULL,
    stdout: int | object = subprocess.DEVNULL,
    stderr: int | object = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    inherit_env: bool = True, executable: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived program; the caller owns it and must reap it (:func:`stop`).
    ``executable`` runs instead of argv[0] (which ``ps`` still shows)."""
    args = [str(a) for a in argv]
    log.debug("spawn: %s", describe(args, env))
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,  # type: ignore[arg-type]
            stdout=stdout,  # type: ignore[arg-type]
            stderr=stderr,  # type: ignore[arg-type]
            env=child_env(env, inherit_env),
            executable=executable,
            pass_fds=tuple(pass_fds),
            # Own session: a Ctrl-C at the terminal reaches kvmsnap, which then shuts
            # its children down in order, instead of killing QEMU mid-write.
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise HostError(f"program not found: {args[0]}") from exc
    SPAWNED_PIDS.append(proc.pid)
    return proc


class ShProgram:
    """A program driven through the ``sh`` library (the product owner's choice for restic).

    A thin layer over :class:`Call`: the same rules as :func:`run` (arguments as a list,
    secrets only in the environment and masked in logs and errors, a timeout on every call),
    and programs left running are registered like :func:`spawn`'s and ended by :func:`end`.
    """

    def __init__(self, name: str, package: str, *, env: Mapping[str, str] | None = None,
                 timeout: float) -> None:
        import sh

        self.path = find_program(name, package)
        self.secrets = secret_values(env)
        self.timeout = timeout
        # In the background so that every call, waited for at once or not, ends in finish().
        self._command = sh.Command(self.path).bake(
            _env=child_env(env), _tty_out=False, _truncate_exc=False, _timeout=timeout,
            _bg=True, _bg_exc=False)

    def run(self, args: Sequence[str], *, cwd: Path | None = None,
            ok_codes: Iterable[int] = (0,)) -> Result:
        """Run to completion; raise :class:`ProcessError` on failure or timeout."""
        return self.finish(self._launch("run (sh)", args, _cwd=str(cwd) if cwd else None,
                                        _ok_code=list(ok_codes), _in=None))

    def run_to_file(self, args: Sequence[str], out: Any) -> None:
        """Run with stdout written to the open binary file ``out`` (large outputs)."""
        self.finish(self._launch("run (sh) > file", args, _out=out, _in=None))

    def start(self, args: Sequence[str], *, stdin_fd: int, cwd: Path | None = None,
              ok_codes: Iterable[int] = (0,)):
        """Start in the background reading ``stdin_fd``; returns sh's RunningCommand.

        The child gets a duplicate of ``stdin_fd`` as its stdin (no copying thread); the
        caller closes its own copy, and ends with :meth:`finish` or :meth:`abort`.
        """
        running = self._launch("start (sh)", args, _cwd=str(cwd) if cwd else None,
                               _ok_code=list(ok_codes), _in=stdin_fd)
        SPAWNED_PIDS.append(running.pid)
        return running

    def finish(self, running) -> Result:
        """Wait for a started program; raise :class:`ProcessError` if it failed."""
        import sh

        call = self._call(running.cmd[1:])
        try:
            with waited_by_this_thread(running.pid):
                running.wait()
        except sh.ErrorReturnCode as exc:  # a signal too (sh.SignalException)
            raise call.failed(exc.exit_code, exc.stderr) from None
        except sh.TimeoutException:
            raise call.timed_out() from None
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, a failing watch): never orphan it
            self.abort(running)
            raise
        return call.result(running.exit_code, str(running), running.stderr)

    def abort(self, running) -> None:
        """End a started program at once (SIGKILL, no SIGTERM first) and reap it."""
        end(running.pid, soft=False)
        with contextlib.suppress(Exception):
            running.wait()

    def _launch(self, doing: str, args: Sequence[str], **options: Any):
        call = self._call(args)
        log.debug("%s: %s", doing, call.shown)
        return self._command(*call.argv[1:], **options)

    def _call(self, args: Iterable[object]) -> Call:
        return Call.of((self.path, *args), self.secrets, self.timeout)


# -- ending ----------------------------------------------------------------------------------
def end(target: subprocess.Popen[bytes] | int, *, grace: float = 5.0,
        soft: bool = True) -> str:
    """End a program kvmsnap started, soft -> hard: SIGTERM, then SIGKILL after ``grace``
    seconds (at once with ``soft=False``). Returns the rung that ended it: terminate, kill.

    ``target`` is our own child (a Popen: reaped here, so its exit code is known), or a PID
    only (recovery's orphans, checked with :func:`same_process` first; or restic under sh,
    which reaps its own children): then "ended" means gone or a zombie.
    """
    gone = _child_gone if isinstance(target, subprocess.Popen) else _pid_gone
    if soft:
        _signal(target, signal.SIGTERM)
        if gone(target, grace):
            return "terminate"
    _signal(target, signal.SIGKILL)
    # A killed process only lingers in uninterruptible sleep (a hung FUSE or NFS read): say so
    if not gone(target, KILL_WAIT):
        log.error("process %s did not end %g s after SIGKILL (stuck in the kernel?)",
                  getattr(target, "pid", target), KILL_WAIT)
    return "kill"


def stop(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> int:
    """Hard end of a program we spawned (:func:`end`). Returns its exit code."""
    end(proc, grace=grace)
    return proc.returncode


def end_pid(pid: int, grace: float = 10.0) -> None:
    """:func:`end` for a process of ours known by PID only (recovery, :func:`same_process`)."""
    end(pid, grace=grace)


def _signal(target: subprocess.Popen[bytes] | int, signum: int) -> None:
    if isinstance(target, subprocess.Popen):
        target.send_signal(signum)  # a no-op once the child has been reaped
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(target, signum)


def _child_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# -- processes known by PID -------------------------------------------------------------------
#: the kernel's random id of this boot: a PID and start time name one process of one boot
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def boot_id() -> str:
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:  # no procfs entry (an odd container): PID and start time must do
        return "unknown"


def identity(pid: int) -> str:
    """``PID:START:BOOT`` - a process, told apart from a later one that reuses its PID, in
    this boot or (after a reboot, when start times begin again) in another."""
    start = _start_time(pid)
    return f"{pid}:gone" if start is None else f"{pid}:{start}:{boot_id()}"


def same_process(recorded: str | None) -> int | None:
    """The PID of the recorded process if it is still alive (and not a zombie), else None.
    Identities recorded before the boot id was (``PID:START``) still read: they are
    compared on PID and start time alone, as they always were."""
    if not recorded or recorded.endswith(":gone"):
        return None
    pid_text, _, rest = recorded.partition(":")
    start, _, boot = rest.partition(":")
    pid = int(pid_text)
    # A process of an earlier boot: whatever has its PID (and even its start time) now is
    # another. A zombie, or a process that is gone, is no process to talk to either.
    if (boot and boot != boot_id()) or _is_zombie(pid):
        return None
    return pid if str(_start_time(pid)) == start else None


def _start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat``: the process's start, in clock ticks since boot."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def environment(values: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` removed, restored on exit: how
    callers hand secrets to the programs started here without putting them in argv."""
    saved = {key: os.environ.get(key) for key in [*values, *unset]}
    for key in unset:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
