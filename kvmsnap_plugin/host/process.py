"""The one place that starts programs.

Rules, as in borgmatic's execute.py: argv lists only (never a shell), every call has a
timeout, secrets travel only in the environment and are masked wherever a command line or
its output is logged. Long-lived programs (QEMU, qemu-storage-daemon) are started with
:func:`spawn` and owned by a context manager elsewhere; kvmsnap only ever signals PIDs it
started itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
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

log = logging.getLogger(__name__)

#: Environment variables whose values must never be shown.
SECRET_ENV = frozenset({
    "BORG_PASSPHRASE",
    "BORG_PASSCOMMAND",
    "BORG_NEW_PASSPHRASE",
    "RESTIC_PASSWORD",
    "RESTIC_PASSWORD_COMMAND",
    "AWS_SECRET_ACCESS_KEY",
    "B2_ACCOUNT_KEY",
    "AZURE_ACCOUNT_KEY",
})

MASK = "***"

#: Every PID spawned by this process, so tests can prove nothing survives.
SPAWNED_PIDS: list[int] = []


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def secret_values(env: Mapping[str, str] | None) -> list[str]:
    """The secret values in ``env`` (and in our own environment), longest first."""
    merged = dict(os.environ)
    merged.update(env or {})
    values = {v for k, v in merged.items() if k in SECRET_ENV and v}
    return sorted(values, key=len, reverse=True)


def mask(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def describe(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A loggable, masked rendering of a command line."""
    return mask(shlex.join(str(a) for a in argv), secret_values(env))


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


def child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged.update(env or {})
    # Programs we parse must speak plain C-locale English.
    merged.setdefault("LC_ALL", "C.UTF-8")
    return merged


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
    cwd: os.PathLike[str] | str | None = None,
) -> Result:
    """Run a program to completion; raise :class:`ProcessError` on failure or timeout."""
    args = tuple(str(a) for a in argv)
    secrets = secret_values(env)
    shown = mask(shlex.join(args), secrets)
    log.debug("run: %s", shown)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_env(env),
            timeout=timeout,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostError(f"program not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(
            f"{args[0]} did not finish within {timeout:g} s: {shown}",
            "raise the timeout, or check why the program hangs",
        ) from exc
    out = proc.stdout.decode(errors="replace") if proc.stdout is not None else ""
    err = proc.stderr.decode(errors="replace")
    result = Result(args, proc.returncode, out, mask(err, secrets))
    if check and proc.returncode not in set(ok_codes):
        last = result.stderr.strip().splitlines()[-1:] or ["(no error output)"]
        raise ProcessError(
            f"{Path(args[0]).name} failed with exit code {proc.returncode}: {last[0]}",
            f"run it by hand to see more: {shown}",
            returncode=proc.returncode,
            stderr=result.stderr,
        )
    return result


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: int | object = subprocess.DEVNULL,
    stdout: int | object = subprocess.DEVNULL,
    stderr: int | object = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-lived program; the caller owns it and must reap it."""
    args = [str(a) for a in argv]
    log.debug("spawn: %s", describe(args, env))
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,  # type: ignore[arg-type]
            stdout=stdout,  # type: ignore[arg-type]
            stderr=stderr,  # type: ignore[arg-type]
            env=child_env(env),
            pass_fds=tuple(pass_fds),
            # Own session: a Ctrl-C at the terminal reaches kvmsnap, which then shuts
            # its children down in order, instead of killing QEMU mid-write.
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise HostError(f"program not found: {args[0]}") from exc
    SPAWNED_PIDS.append(proc.pid)
    return proc


def stop(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> int:
    """Hard end of a program we spawned: SIGTERM, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode


class ShProgram:
    """A program driven through the ``sh`` library (the product owner's choice for restic).

    The same rules as :func:`run`: arguments as a list, secrets only in the environment and
    masked in logs and errors, a timeout on every call.
    """

    def __init__(self, name: str, package: str, *, env: Mapping[str, str] | None = None,
                 timeout: float) -> None:
        import sh

        self.path = find_program(name, package)
        self.env = child_env(env)
        self.secrets = secret_values(env)
        self.timeout = timeout
        self._command = sh.Command(self.path).bake(_env=self.env, _tty_out=False,
                                                   _truncate_exc=False)

    def run(self, args: Sequence[str], *, cwd: Path | None = None,
            ok_codes: Iterable[int] = (0,)) -> Result:
        import sh

        argv = (self.path, *map(str, args))
        log.debug("run (sh): %s", mask(shlex.join(argv), self.secrets))
        try:
            done = self._command(*argv[1:], _cwd=str(cwd) if cwd else None,
                                 _timeout=self.timeout, _ok_code=list(ok_codes),
                                 _return_cmd=True, _in=None)
        except sh.ErrorReturnCode as exc:
            raise self._failure(argv, exc.exit_code, exc.stderr) from None
        except sh.TimeoutException:
            raise ProcessError(f"{Path(self.path).name} did not finish within "
                               f"{self.timeout:g} s", "raise the timeout") from None
        return Result(argv, done.exit_code, str(done), mask(done.stderr.decode(errors="replace"),
                                                             self.secrets))

    def run_to_file(self, args: Sequence[str], out: Any) -> None:
        """Run with stdout written to the open binary file ``out`` (large outputs)."""
        import sh

        argv = (self.path, *map(str, args))
        log.debug("run (sh): %s > file", mask(shlex.join(argv), self.secrets))
        try:
            self._command(*argv[1:], _timeout=self.timeout, _out=out, _in=None)
        except sh.ErrorReturnCode as exc:
            raise self._failure(argv, exc.exit_code, exc.stderr) from None
        except sh.TimeoutException:
            raise ProcessError(f"{Path(self.path).name} did not finish within "
                               f"{self.timeout:g} s", "raise the timeout") from None

    def start(self, args: Sequence[str], *, stdin_fd: int, cwd: Path | None = None,
              ok_codes: Iterable[int] = (0,)):
        """Start in the background reading ``stdin_fd``; returns sh's RunningCommand.

        The child gets a duplicate of ``stdin_fd`` as its stdin (no copying thread); the
        caller closes its own copy.
        """
        argv = (self.path, *map(str, args))
        log.debug("start (sh): %s", mask(shlex.join(argv), self.secrets))
        running = self._command(*argv[1:], _cwd=str(cwd) if cwd else None,
                                _timeout=self.timeout, _ok_code=list(ok_codes), _bg=True,
                                _bg_exc=False, _in=stdin_fd)
        SPAWNED_PIDS.append(running.pid)
        return running

    def finish(self, running) -> Result:
        """Wait for a started program; raise :class:`ProcessError` if it failed."""
        import sh

        argv = tuple(str(a) for a in running.cmd)
        try:
            running.wait()
        except sh.ErrorReturnCode as exc:
            raise self._failure(argv, exc.exit_code, exc.stderr) from None
        except sh.SignalException as exc:
            raise self._failure(argv, exc.exit_code, exc.stderr) from None
        except sh.TimeoutException:
            raise ProcessError(f"{Path(self.path).name} did not finish within "
                               f"{self.timeout:g} s", "raise the timeout") from None
        return Result(argv, running.exit_code, str(running),
                      mask(running.stderr.decode(errors="replace"), self.secrets))

    def _failure(self, argv: Sequence[str], code: int, stderr: bytes) -> ProcessError:
        text = mask(stderr.decode(errors="replace"), self.secrets)
        last = text.strip().splitlines()[-1:] or ["(no error output)"]
        return ProcessError(f"{Path(self.path).name} failed with exit code {code}: {last[0]}",
                            f"run it by hand to see more: {mask(shlex.join(argv), self.secrets)}",
                            returncode=code, stderr=text)


def identity(pid: int) -> str:
    """``PID:START`` - a process, told apart from a later one that reuses its PID."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return f"{pid}:gone"
    return f"{pid}:{fields[19]}"  # field 22 of stat: start time in clock ticks


def same_process(recorded: str | None) -> int | None:
    """The PID of the recorded process if it is still alive (and not a zombie), else None."""
    if not recorded or recorded.endswith(":gone"):
        return None
    pid = int(recorded.split(":", 1)[0])
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return pid if state != "Z" and identity(pid) == recorded else None


@contextlib.contextmanager
def environment(values: Mapping[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` removed, restored on exit: how
    callers hand secrets to the programs started here without putting them in argv."""
    keys = [*values, *unset]
    saved = {key: os.environ.get(key) for key in keys}
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


def end_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: a process kvmsnap started, known by
    PID only (recovery finds it in the journal, checked with :func:`same_process`)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
