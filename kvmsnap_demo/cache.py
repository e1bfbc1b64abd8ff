"""What the demo and the tests build once and keep under ``~/.cache/kvmsnap/``.

Parallel test sessions (and helpers) share the cache: a build holds a lock file, runs in a
staging directory next to its final place and is renamed into place only when whole, so a
reader never sees half a build and an interrupted one leaves nothing it would mistake for
done.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import mounts

log = logging.getLogger(__name__)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold ``path`` exclusively: parallel sessions wait for one another's build."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_once(final: Path, done: str, build: Callable[[Path], None], lock: Path) -> Path:
    """Return ``final``, made first by ``build(staging)`` unless ``final/done`` exists.

    ``build`` fills a fresh staging directory and writes ``done`` last; the directory is
    made readable by all (a QEMU run as another user reads it) and renamed to ``final``.
    """
    with cache_lock(lock):
        if (final / done).exists():
            return final
        # Not done: a marker deleted by hand, or staging dirs a killed build left (GiBs).
        for left in (final, *final.parent.glob(f".{final.name}-{'?' * 8}")):  # mkdtemp's
            remove_build_dir(left)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(staging)
            if not (staging / done).exists():
                raise HostError(f"the build of {final.name} did not write {done}",
                                "look at the log above, then run again (a bug if none)")
            staging.chmod(0o755)  # mkdtemp made it 0700
            staging.rename(final)
        finally:
            remove_build_dir(staging)
    return final


def remove_build_dir(path: Path) -> None:
    """Delete a build directory, but never through a mount point (it could be the host's
    /dev, bind-mounted into a chroot)."""
    if not path.exists():
        return
    left = mounts.mounts_under(path)
    if left:
        raise HostError(f"still mounted under {path}: {', '.join(left)}",
                        f"unmount them by hand, then remove {path}")
    shutil.rmtree(path, ignore_errors=True)
