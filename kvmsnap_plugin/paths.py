"""Where kvmsnap keeps things, and names that are safe as path components."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: RAM state, clone overlays, raw views, default mount roots (per run: 0700)
DEFAULT_WORKDIR = Path("/var/tmp/kvmsnap")
#: the config file the units and the README name (`kvmsnap config validate` reads it)
DEFAULT_CONFIG = Path("/etc/kvmsnap/kvmsnap.toml")
#: journals and per-VM locks (0700): what `kvmsnap recover` reads
STATE_DIR = Path(os.environ.get("KVMSNAP_STATE_DIR", "/var/lib/kvmsnap"))
#: small per-run things that must not outlive a reboot: unix sockets (0700)
RUNTIME_DIR = Path("/run/kvmsnap")


def is_private_dir(path: Path) -> bool:
    """A real directory (no symlink) of this user's, open to nobody else, writable."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and stat.S_IMODE(info.st_mode) == 0o700 and os.access(path, os.W_OK))


def cache_root() -> Path:
    """Where kvmsnap caches what it builds or learns (the demo guest, the KVM probe)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmsnap"


def safe_name(name: str) -> str:
    """``name`` as one path component: no slashes, spaces or leading dots."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "vm"


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A short, private (0700) directory for unix sockets, removed afterwards.

    Unix socket paths are limited to 107 bytes, which deep work directories exceed. The
    base is ``/run/kvmsnap`` when it is ours alone; else (not root, or someone else's)
    the temporary directory, where the per-run directory is made unique and 0700.
    """
    base = RUNTIME_DIR
    with contextlib.suppress(OSError):
        base.mkdir(mode=0o700)
    if not is_private_dir(base):
        base = Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix="s-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_if_empty_socket_dir(directory: Path) -> bool:
    """Remove ``directory`` if it is an empty per-run directory of :func:`socket_dir`.

    A run killed while its disks were exposed leaves the export's socket directory behind;
    recovery deletes the socket it journaled, and then this (an empty directory only:
    ``rmdir`` never deletes anything else)."""
    if not directory.name.startswith("s-") or directory.parent not in (
            RUNTIME_DIR, Path(tempfile.gettempdir())):
        return False
    try:
        directory.rmdir()
    except OSError:  # not empty, or gone
        return False
    return True
