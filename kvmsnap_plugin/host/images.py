"""Disk image files through qemu-img: overlays, raw copies, standalone copies.

The source format is always named (``-f``), never guessed from the contents: a guest can
write a qcow2 header naming a host file as backing file into its raw disk. Every image
written here is 0600 from its first byte: qemu-img writes into a new private file that
replaces the target once complete.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kvmsnap_plugin.host import dirs, process
from kvmsnap_plugin.paths import safe_name

log = logging.getLogger(__name__)


def create_overlay(path: Path, backing: str, backing_format: str, size: int) -> None:
    """A qcow2 overlay on ``backing`` without opening it (the VM holds its lock)."""
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
                 "-F", backing_format, path, str(size)], timeout=60)
    path.chmod(0o600)


def convert(image: Path, image_format: str, dest: Path, dest_format: str, *,
            shared: bool = False, timeout: float = 3600) -> Path:
    """``image`` (read as ``image_format``) copied into ``dest`` as ``dest_format``, sparse
    and standalone, mode 0600; ``shared`` reads an image a VM holds (``-U``)."""
    with dirs.replacing(dest) as temporary:
        # qemu-img truncates and reuses the file it finds: its mode stays 0600.
        process.run(["qemu-img", "convert", *(["-U"] if shared else []), "-f", image_format,
                     "-O", dest_format, image, temporary], timeout=timeout)
    return dest


def raw_copy(image: Path, dest: Path, image_format: str) -> Path:
    """A raw copy of a disk image, readable while a VM holds it (``-U``)."""
    return convert(image, image_format, dest, "raw", shared=True, timeout=600)


def keep_images(images: Sequence[tuple[str, Path, str]], keep_dir: Path,
                vm: str) -> list[Path]:
    """Write ``(device, image, format)`` out as standalone, sparse qcow2 images (no backing
    file), 0600, into ``keep_dir/VM`` (created 0700, or checked: writable by nobody else):
    VMs that share a keep directory never overwrite each other's images."""
    directory = dirs.user_dir(keep_dir / safe_name(vm), "the --keep directory")
    kept = []
    for device, image, image_format in images:
        target = directory / f"{safe_name(device)}.qcow2"
        log.info("keeping the clone's disk %s as %s", device, target)
        kept.append(convert(image, image_format, target, "qcow2"))
    return kept
