"""The parent's disk chain given back: each overlay committed into its frozen image, deleted.

Order matters: the frozen images are the backing files of the clone's overlays. Once the
parent's overlay is committed into a frozen image, the clone's view of that disk changes,
so everything that reads the clone's disks must be done before :func:`commit_back`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.errors import KvmsnapError, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import COMMIT_TIMEOUT, Commit, ForkedDisk, Recovery

log = logging.getLogger(__name__)


def commit_back(backend: Backend, disks: Sequence[ForkedDisk],
                timeout: float = COMMIT_TIMEOUT) -> list[Commit]:
    """Live-commit each parent overlay that is a disk's active layer, then delete it.

    An active commit: QEMU copies the overlay down while the guest keeps writing, mirrors
    new writes, and pivots the disk back onto the frozen image, which then holds every
    write. An overlay that is not (or no longer) on top holds no write the VM still needs.
    Every disk is attempted even if one fails.
    """
    def give_back(disk: ForkedDisk) -> Commit:
        started = time.monotonic()
        written = 0
        if backend.active_overlays([disk]):
            log.info("committing the parent's writes on %s back into %s", disk.disk.device,
                     disk.frozen.name)
            written = backend.commit_one(disk, timeout)
        else:
            log.debug("%s is not the active layer; nothing to commit", disk.parent_overlay.name)
        backend.detach_overlays([disk])
        delete_overlay(disk)
        return Commit(disk.disk.device, time.monotonic() - started, written)

    return commit_each(disks, give_back)


def commit_each(disks: Sequence[ForkedDisk],
                commit_one: Callable[[ForkedDisk], Commit]) -> list[Commit]:
    """Commit every disk, even after one fails; then raise for all that failed."""
    done, failures = [], []
    for disk in disks:
        try:
            done.append(commit_one(disk))
        except KvmsnapError as exc:
            failures.append(f"{disk.disk.device}: {exc}")
    if failures:
        raise VMError("committing the VM's overlays back failed: " + "; ".join(failures),
                      "the VM still runs on its overlay; run `kvmsnap recover` to retry")
    return done


def commit_offline(disks: Sequence[ForkedDisk], result: Recovery) -> None:
    """The parent's QEMU is gone: fold each overlay's writes into its frozen image."""
    for disk in disks:
        if not disk.parent_overlay.exists():
            continue
        process.run(["qemu-img", "commit", "-q", "-f", "qcow2", disk.parent_overlay],
                    timeout=3600)
        delete_overlay(disk)
        result.did(f"committed {disk.parent_overlay.name} into {disk.frozen.name} offline "
                   "(the VM was not running)")


def delete_overlay(disk: ForkedDisk) -> bool:
    """Delete the parent's overlay of ``disk``: the one place kvmsnap does. Callers have
    made sure it holds no write the VM still needs (committed, or never the VM's layer).
    True if there was a file to delete."""
    try:
        disk.parent_overlay.unlink()
    except FileNotFoundError:
        return False
    return True
