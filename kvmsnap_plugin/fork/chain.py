"""The parent's disk chain given back: each overlay committed into its frozen image, deleted.

Order matters: the frozen images are the backing files of the clone's overlays. Once the
parent's overlay is committed into a frozen image, the clone's view of that disk changes,
so everything that reads the clone's disks must be done before :func:`commit_back`.

An overlay is deleted in one place, :func:`delete_overlay`, and only once no block node of
the running parent names it: neither as its image nor anywhere in its backing chain. Where
an overlay sits is read from QEMU's whole block graph, never inferred from the top node
alone: another tool may have put its own snapshot on top of ours during the backup, and
then our overlay, in the middle of the chain, holds every write since the fork.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmsnap_plugin.backends import Backend
from kvmsnap_plugin.errors import HostError, KvmsnapError, VMError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import COMMIT_TIMEOUT, Commit, ForkedDisk, Recovery
from kvmsnap_plugin.vm.qmp import Monitor

log = logging.getLogger(__name__)

#: what to do when an overlay cannot be given back now
RETRY_HINT = "the VM keeps its writes in the overlay; run `kvmsnap recover` to retry"
#: how long a closed overlay may take to leave QEMU's graph (libvirt removes the nodes of a
#: pivoted or committed image just after the job ends)
RELEASE_WAIT = 5.0


class Layer(StrEnum):
    """Where a parent's overlay is in its disk's chain."""

    ACTIVE = "active"  # the disk's top: a live commit, then a pivot onto the frozen image
    BELOW = "below"  # under another tool's snapshot: committed through the middle
    UNUSED = "unused"  # no disk's layer (never was, or given back): nothing to commit


@dataclass(frozen=True)
class Place:
    layer: Layer
    root: str = ""  # the node at the top of the chain that holds the overlay


# -- the block graph ------------------------------------------------------------------------------
def image_chain(image: dict[str, Any] | None) -> list[str]:
    """The file names of a QMP ImageInfo and its backing images, top down."""
    files = []
    while image:
        files.append(image.get("filename", ""))
        image = image.get("backing-image")
    return files


def names(filename: str, path: Path) -> bool:
    """Does QEMU's ``filename`` name ``path``? A ``json:`` name that mentions it counts:
    when unsure, the file is in use."""
    if filename.startswith("json:"):
        return str(path) in filename
    return bool(filename) and os.path.realpath(filename) == os.path.realpath(path)


def place_in(path: Path, blocks: list[dict[str, Any]],
             nodes: list[dict[str, Any]]) -> Place:
    """Where ``path`` is, from QMP ``query-block`` and ``query-named-block-nodes``.

    Raises VMError when a node names it from outside every disk's chain: kvmsnap cannot
    commit it there and must not delete it.
    """
    for block in blocks:
        inserted = block.get("inserted") or {}
        files = image_chain(inserted.get("image")) or [inserted.get("file", "")]
        if names(files[0], path):
            return Place(Layer.ACTIVE, inserted.get("node-name", ""))
        if any(names(f, path) for f in files[1:]):
            return Place(Layer.BELOW, inserted.get("node-name", ""))
    above = [n.get("node-name", "?") for n in nodes
             if any(names(f, path) for f in image_chain(n.get("image"))[1:])]
    if above:
        raise VMError(f"{path.name} is the backing file of block node(s) "
                      f"{', '.join(above)}, which no disk uses: kvmsnap cannot commit it there",
                      "remove those nodes (QMP blockdev-del), then run `kvmsnap recover`")
    return Place(Layer.UNUSED)


def locate(monitor: Monitor, disk: ForkedDisk) -> Place:
    """Where ``disk``'s overlay is now; raises if QEMU does not answer."""
    return place_in(disk.parent_overlay, monitor.execute("query-block"),
                    monitor.execute("query-named-block-nodes"))


def holders(monitor: Monitor, path: Path) -> list[str]:
    """The block nodes that have ``path`` open or name it in their backing chain."""
    return [n.get("node-name", "?") for n in monitor.execute("query-named-block-nodes")
            if names(n.get("file", ""), path)
            or any(names(f, path) for f in image_chain(n.get("image")))]


def delete_overlay(disk: ForkedDisk, monitor: Monitor | None) -> bool:
    """Delete the parent's overlay of ``disk``: the one place kvmsnap does.

    ``monitor`` is the running parent's: the file goes only once none of its block nodes
    names it (VMError otherwise, the file kept). None means the parent's QEMU is gone and
    the caller has folded the overlay's writes into the frozen image. True if there was a
    file to delete.
    """
    if monitor is not None and disk.parent_overlay.exists():
        deadline = time.monotonic() + RELEASE_WAIT
        while users := holders(monitor, disk.parent_overlay):
            if time.monotonic() > deadline:
                raise VMError(f"kept {disk.parent_overlay}: the VM's block node(s) "
                              f"{', '.join(users)} still use it", RETRY_HINT)
            time.sleep(0.1)
    try:
        disk.parent_overlay.unlink()
    except FileNotFoundError:
        return False
    return True


# -- online: the parent's QEMU runs ---------------------------------------------------------------
def commit_back(backend: Backend, disks: Sequence[ForkedDisk],
                timeout: float = COMMIT_TIMEOUT) -> list[Commit]:
    """Give every overlay back (:func:`give_back_chain`); a parent that had stopped on an
    I/O error is resumed, and the run fails with a HostError that names the cause."""
    commits, stopped = give_back_chain(backend, disks, timeout)
    if stopped:
        raise HostError(f"the VM stopped on an I/O error during the backup: {stopped}",
                        "free space there, or pass --overlay-dir on a larger filesystem; "
                        "its writes are back in its images and it runs again")
    return commits


def give_back_chain(backend: Backend, disks: Sequence[ForkedDisk],
                    timeout: float = COMMIT_TIMEOUT) -> tuple[list[Commit], str | None]:
    """Commit each overlay where it is, then delete it; every disk is attempted.

    A parent stopped on an I/O error (its overlay's filesystem filled up: QEMU pauses the
    guest and retries the write on ``cont``) is committed into the frozen images first, which
    have their space, then resumed. Returns the commits and that error, if there was one.
    """
    stopped = io_error(backend.monitor)
    try:
        commits = commit_each(disks, lambda disk: _give_back(backend, disk, timeout))
    except VMError as exc:
        if stopped:
            raise VMError(f"{exc}; the VM is paused on an I/O error ({stopped})",
                          "free space there, then run `kvmsnap recover`") from None
        raise
    if stopped:
        backend.resume()
        log.warning("resumed the VM after its writes were committed back; it had stopped on "
                    "an I/O error: %s", stopped)
    return commits, stopped


def _give_back(backend: Backend, disk: ForkedDisk, timeout: float) -> Commit:
    started = time.monotonic()
    place = locate(backend.monitor, disk)
    written = 0
    if place.layer is Layer.ACTIVE:
        log.info("committing the parent's writes on %s back into %s", disk.disk.device,
                 disk.frozen.name)
        written = backend.commit_one(disk, timeout)
    elif place.layer is Layer.BELOW:
        log.warning("%s: another snapshot was put on top of kvmsnap's overlay during the "
                    "backup; committing the overlay through the middle of the chain",
                    disk.disk.device)
        written = backend.commit_below(disk, place.root, timeout)
    backend.detach_overlays([disk])
    delete_overlay(disk, backend.monitor)
    return Commit(disk.disk.device, time.monotonic() - started, written, place.layer.value)


def commit_each(disks: Sequence[ForkedDisk], commit_one: Callable[[ForkedDisk], Commit],
                hint: str = RETRY_HINT) -> list[Commit]:
    """Commit every disk, even after one fails; then raise for all that failed, with
    their own advice if they agree on one, else ``hint``."""
    done, failures, hints = [], [], set()
    for disk in disks:
        try:
            done.append(commit_one(disk))
        except KvmsnapError as exc:
            failures.append(f"{disk.disk.device}: {exc}")
            hints.add(exc.hint if exc.hint != type(exc).default_hint else hint)
    if failures:
        raise VMError("giving the VM's overlays back failed: " + "; ".join(failures),
                      hints.pop() if len(hints) == 1 else hint)
    return done


def io_error(monitor: Monitor) -> str | None:
    """If the VM stopped on an I/O error: which image, and on what filesystem."""
    if monitor.runstate() != "io-error":
        return None
    failed = [b for b in monitor.execute("query-block")
              if b.get("io-status", "ok") != "ok" and b.get("inserted")]
    what = [_describe_failure(b) for b in failed]
    return "; ".join(what) or "QEMU reports no device"


def _describe_failure(block: dict[str, Any]) -> str:
    image = Path(block["inserted"].get("file", "?"))
    status = block.get("io-status")
    if status != "nospace":
        return f"writing {image} failed ({status})"
    try:
        free = os.statvfs(image.parent)
        left = f", {free.f_bavail * free.f_frsize >> 20} MiB free"
    except OSError:
        left = ""
    return f"no space left for {image} on the filesystem of {image.parent}{left}"


# -- offline: the parent's QEMU is gone -----------------------------------------------------------
def stamp_of(image: Path) -> tuple[int, ...]:
    """What proves an image unchanged: size, modification time and inode (not the device
    number: a device-mapper volume may get another one after a reboot)."""
    info = image.stat()
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def holds_writes(overlay: Path) -> bool:
    """Does the overlay hold any cluster of its own? (``qemu-img commit`` empties it.)
    Without ``-U``: an overlay some process still holds open fails here, never counts as
    empty."""
    extents = json.loads(process.run(["qemu-img", "map", "-f", "qcow2",
                                      "--output=json", overlay], timeout=600).stdout)
    return any(extent.get("depth") == 0 for extent in extents)


def check_unchanged(disk: ForkedDisk) -> None:
    """Refuse an offline commit onto a frozen image that changed after the fork: the VM
    was started again on it (from its original command line), and the overlay's writes are
    older than what it holds now."""
    fix = (f"keep both files; if the VM did not run on {disk.frozen} since the backup, "
           f"commit by hand (`qemu-img commit -f qcow2 {disk.parent_overlay}`), else decide "
           "which to keep; then run `kvmsnap recover` again")
    if disk.frozen_stamp is None:
        raise VMError(f"cannot prove {disk.frozen} unchanged since the fork: the run ended "
                      f"before recording it, and {disk.parent_overlay.name} holds writes", fix)
    if stamp_of(disk.frozen) != tuple(disk.frozen_stamp):
        raise VMError(f"{disk.frozen} changed after the fork (the VM ran on it again?): "
                      f"committing {disk.parent_overlay.name} into it would overwrite newer "
                      "data", fix)


def commit_offline(disks: Sequence[ForkedDisk], result: Recovery) -> None:
    """The parent's QEMU is gone: fold each overlay's writes into its frozen image, if it
    is unchanged since the fork. Deleting the overlays is left to the caller."""
    def commit(disk: ForkedDisk) -> Commit:
        if not disk.parent_overlay.exists() or not holds_writes(disk.parent_overlay):
            return Commit(disk.disk.device, 0.0, 0, "unused")
        check_unchanged(disk)
        started = time.monotonic()
        process.run(["qemu-img", "commit", "-q", "-f", "qcow2", disk.parent_overlay],
                    timeout=3600)
        result.did(f"committed {disk.parent_overlay.name} into {disk.frozen.name} offline "
                   "(the VM was not running)")
        return Commit(disk.disk.device, time.monotonic() - started, 0)

    commit_each(disks, commit, "see the message; the overlays are kept")
