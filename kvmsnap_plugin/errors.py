"""One root exception, a few meaningful kinds, each carrying a fix for the user.

The CLI prints ``str(error)`` and ``error.hint`` on one line; tracebacks only with --debug.
"""

from __future__ import annotations


class KvmsnapError(Exception):
    """Root of every error kvmsnap raises on purpose."""

    #: default advice when the raiser gives none
    default_hint = "run with --debug for details"
    #: CLI exit code for this kind of error
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint or self.default_hint

    def one_line(self) -> str:
        return f"{self} (fix: {self.hint})"


class UsageError(KvmsnapError):
    """Bad input from the user: arguments, config files, names."""

    default_hint = "see `kvmsnap --help`"


class HostError(KvmsnapError):
    """The host lacks something kvmsnap needs: a program, a kernel feature, space."""

    default_hint = "run `kvmsnap doctor` to see what is missing"


class VMError(KvmsnapError):
    """The virtual machine cannot be handled: not QMP, not running, unclonable devices."""

    default_hint = "check the VM's state with `virsh domstate` or QMP `query-status`"


class ProcessError(KvmsnapError):
    """A program kvmsnap ran failed or timed out."""

    def __init__(
        self, message: str, hint: str | None = None, *, returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr = stderr


class StepTimeout(KvmsnapError):
    """A step did not finish within its time limit."""

    default_hint = "raise the matching timeout option, or look at the guest's console"


class ArchiveError(KvmsnapError):
    """An archiver (borg, restic, a plugin) failed."""

    default_hint = "check the repository and its passphrase; run the archiver by hand"


class SkipBackup(KvmsnapError):
    """A deliberate skip (a plugin vetoed, or nothing to do): borgmatic's soft failure."""

    default_hint = "nothing to fix if the skip was intended"
    exit_code = 75
