"""Disk image files through qemu-img: overlays, raw copies, standalone copies."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from kvmsnap_plugin.host import process

log = logging.getLogger(__name__)


def create_overlay(path: Path, backing: str, backing_format: str, size: int) -> None:
    """A qcow2 overlay on ``backing`` without opening it (the VM holds its lock)."""
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
                 "-F", backing_format, path, str(size)], timeout=60)
    path.chmod(0o600)


def raw_copy(image: Path, dest: Path) -> Path:
    """A raw copy of a disk image, readable while a VM holds it (``-U``)."""
    process.run(["qemu-img", "convert", "-U", "-O", "raw", image, dest], timeout=600)
    return dest


def keep_images(overlays: Sequence[tuple[str, Path]], keep_dir: Path) -> list[Path]:
    """Write the clone's disks out as standalone, sparse qcow2 images (no backing file)."""
    keep_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for device, overlay in overlays:
        target = keep_dir / f"{device}.qcow2"
        log.info("keeping the clone's disk %s as %s", device, target)
        process.run(["qemu-img", "convert", "-O", "qcow2", overlay, target], timeout=3600)
        kept.append(target)
    return kept
