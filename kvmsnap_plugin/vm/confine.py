"""The clone's confinement: the parent's own binary, a clean environment, QEMU's sandbox.

The clone is a second copy of a production VM, started as root; it gets no more than it
needs:

- the binary is the parent's own, ``/proc/PID/exe``, never argv[0] of its command line
  (which that QEMU process can rewrite). The link still works after a package upgrade
  replaced or deleted the file, and it makes the clone the exact QEMU whose migration
  stream it loads. The link is opened first and the parent's identity (PID, start time,
  boot) checked after, so a PID reused since the parent was described is never trusted.
- the environment is :data:`~kvmsnap_plugin.host.process.CLEAN_ENV` alone: none of
  kvmsnap's own (``BORG_PASSPHRASE``, ``RESTIC_PASSWORD``, ...) reaches it. QEMU needs no
  more: no ``TMPDIR`` (``-snapshot`` is refused), no ``HOME`` or display variables (the clone
  has no display or audio). One exception: ``QEMU_MODULE_DIR`` of the parent's own
  environment, when it names a root-owned directory no one else may write: a QEMU
  installed beside the system's (a newer one unpacked into a prefix) loads its modules,
  TCG among them, from there, and would die on the system's.
- QEMU's own seccomp sandbox, when the binary was built with it (the parent's monitor
  lists the option): no obsolete system calls, no setuid, no fork/exec, no scheduler or
  priority changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import CloneBinary, Parent
from kvmsnap_plugin.model.vm import DELETED
from kvmsnap_plugin.vm.parent import option_fields
from kvmsnap_plugin.vm.qemu_args import parse_argv
from kvmsnap_plugin.vm.qmp import Monitor

log = logging.getLogger(__name__)

#: the clone's -sandbox settings (libvirt's own choice for its domains)
SANDBOX = {"obsolete": "deny", "elevateprivileges": "deny", "spawn": "deny",
           "resourcecontrol": "deny"}


def clone_binary(parent: Parent, monitor: Monitor | None) -> CloneBinary:
    """Which QEMU the clone will run (the parent's), and its sandbox: read, nothing started."""
    try:
        path = os.readlink(f"/proc/{parent.pid}/exe")
    except OSError as exc:
        raise _gone(parent.pid) from exc
    sandbox, confinement = sandbox_option(monitor, parent.argv)
    return CloneBinary(process.identity(parent.pid), path, parent.qemu_version, sandbox,
                       confinement)


def sandbox_option(monitor: Monitor | None, argv: Sequence[str]) -> tuple[str | None, str]:
    """The clone's ``-sandbox`` value (None: none) and what the report says of it.

    Probed, not guessed from the version: the parent's QMP lists ``sandbox`` and its
    parameters only when its binary was built with seccomp.
    """
    if monitor is None:
        return None, "not sandboxed: the parent's QEMU was not asked whether it can be"
    try:
        options = monitor.execute("query-command-line-options", {"option": "sandbox"})
    except VMError:  # "invalid option name: sandbox"
        return None, "not sandboxed: this QEMU was built without seccomp (no -sandbox)"
    known = {p["name"] for option in options for p in option.get("parameters", [])}
    wanted = dict(SANDBOX)
    notes = [f"this QEMU has no {key}=" for key in wanted if key not in known]
    pinning = thread_pinning(argv)
    if pinning:
        # resourcecontrol=deny forbids sched_setaffinity/setpriority: a thread-context
        # object (prealloc-context=, pinned preallocation threads) would kill the clone.
        del wanted["resourcecontrol"]
        notes.append(f"resource control allowed for {pinning}")
    value = ",".join(["on", *(f"{k}={v}" for k, v in wanted.items() if k in known)])
    return value, "sandboxed" + (f" ({'; '.join(notes)})" if notes else "")


def thread_pinning(argv: Sequence[str]) -> str | None:
    """What in the command line sets threads' CPU affinity, if anything does."""
    for option in parse_argv(list(argv))[1]:
        if option.name == "object" and option_fields(option.value or "", "qom-type").get(
                "qom-type") == "thread-context":
            return "the VM's thread-context object"
    return None


@contextlib.contextmanager
def parents_binary(binary: CloneBinary, where: Path) -> Iterator[str]:
    """A path that runs the parent's own binary, for as long as the block lasts.

    The binary is opened through ``/proc/PID/exe`` and only then is the parent's identity
    checked: the open file is the parent's, even if its PID is reused the next instant.
    The path is a symbolic link named like the binary, in a directory of its own under the
    private ``where``, to that open file: executed through it, the clone's process name
    (``ps``, ``pgrep``) is the binary's, not a descriptor number.
    """
    pid = int(binary.parent.partition(":")[0])
    try:
        fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _gone(pid) from exc
    link = where / "bin" / Path(binary.path.removesuffix(DELETED)).name
    try:
        if process.same_process(binary.parent) != pid:
            raise _gone(pid)
        link.parent.mkdir(mode=0o700)
        try:
            os.symlink(f"/proc/{os.getpid()}/fd/{fd}", link)
            log.debug("the clone runs the parent's binary %s", binary.path)
            yield str(link)
        finally:
            link.unlink(missing_ok=True)
            link.parent.rmdir()
    finally:
        os.close(fd)


def clone_env(binary: CloneBinary | None) -> dict[str, str]:
    """The clone's whole environment: :data:`process.CLEAN_ENV`, and the parent's
    ``QEMU_MODULE_DIR`` if it is a directory only root can change."""
    env = dict(process.CLEAN_ENV)
    if binary is None:
        return env
    pid = binary.parent.partition(":")[0]
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return env
    for entry in raw.split(b"\0"):
        name, _, value = entry.decode(errors="replace").partition("=")
        if name == "QEMU_MODULE_DIR" and _root_only(Path(value)):
            env[name] = value
    return env


def _root_only(directory: Path) -> bool:
    try:
        info = directory.stat()
    except OSError:
        return False
    return (directory.is_absolute() and stat.S_ISDIR(info.st_mode) and info.st_uid == 0
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _gone(pid: int) -> VMError:
    return VMError(f"the VM's QEMU process {pid} is gone (or its PID is another process's "
                   "now): the clone, which must run that process's own binary, is not started",
                   "see why the VM stopped; `kvmsnap recover` gives its disks their chain back")
