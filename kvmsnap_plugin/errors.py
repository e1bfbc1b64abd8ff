"""One root exception, a few meaningful kinds, each carrying a fix for the user.

The CLI prints ``str(error)`` and ``error.hint`` on one line; tracebacks only with --debug.
"""

from __future__ import annotations


class KvmsnapError(Exception):
    """Root of every error kvmsnap raises on purpose.

    A subclass names its default advice and exit code in its class line:
    ``class UsageError(KvmsnapError, hint="see `kvmsnap --help`")``.
    """

    #: advice when the raiser gives none
    default_hint = "run with --debug for details"
    #: CLI exit code for this kind of error
    exit_code = 2

    def __init_subclass__(cls, *, hint: str | None = None, exit_code: int | None = None,
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.default_hint = hint or cls.default_hint
        cls.exit_code = cls.exit_code if exit_code is None else exit_code

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint or self.default_hint

    def one_line(self) -> str:
        return f"{self} (fix: {self.hint})"


class UsageError(KvmsnapError, hint="see `kvmsnap --help`"):
    """Bad input from the user: arguments, config files, names."""


class HostError(KvmsnapError, hint="run `kvmsnap doctor` to see what is missing"):
    """The host lacks something kvmsnap needs: a program, a kernel feature, space."""


class VMError(KvmsnapError,
              hint="check the VM's state with `virsh domstate` or QMP `query-status`"):
    """The virtual machine cannot be handled: not QMP, not running, unclonable devices."""


class StepTimeout(KvmsnapError,
                  hint="raise the matching timeout option, or look at the guest's console"):
    """A step did not finish within its time limit."""


class ArchiveError(KvmsnapError,
                   hint="check the repository and its passphrase; run the archiver by hand"):
    """An archiver (borg, restic, a plugin) failed."""


class SkipBackup(KvmsnapError, hint="nothing to fix if the skip was intended", exit_code=75):
    """A deliberate skip (a plugin vetoed, or nothing to do): borgmatic's soft failure."""


class ProcessError(KvmsnapError):
    """A program kvmsnap ran failed or timed out."""

    def __init__(self, message: str, hint: str | None = None, *,
                 returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr = stderr
