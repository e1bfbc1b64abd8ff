"""``kvmsnap verify`` of a files archive: is everything there that should be?

Read from the archive's listing, nothing extracted: every disk of the VM record has a tree
(``vdisk0/...``; the record lists disks, not partitions: each filesystem found under a disk,
``vdisk0/p1`` or the whole disk, must hold files), and every configured marker file
(``verify_files = ["vdisk0/p1/etc/hostname"]``) is present. A missing tree, an empty
filesystem or a missing marker fails (exit 1, status ``incomplete``); a crash-consistent
backup is complete but not proven (exit 1, status ``crash-consistent``).
"""

from __future__ import annotations

import re

from kvmsnap_plugin.model import VerifyReport, VerifySettings
from kvmsnap_plugin.run.verify_fetch import Fetched


def filesystems(listing: dict[str, int], disk: str) -> dict[str, tuple[int, int]]:
    """The trees under one disk: ``vdisk0/p1`` (or ``vdisk0``) -> (files, bytes)."""
    found: dict[str, tuple[int, int]] = {}
    for path, size in listing.items():
        parts = path.split("/")
        if parts[0] != disk or len(parts) == 1:
            continue
        where = "/".join(parts[:2]) if re.fullmatch(r"p\d+", parts[1]) else disk
        files, total = found.get(where, (0, 0))
        if size >= 0:
            files, total = files + 1, total + size
        found[where] = (files, total)
    return found


def check_files(fetched: Fetched, settings: VerifySettings) -> VerifyReport:
    """The report on a files archive (nothing booted)."""
    record = fetched.record
    report = VerifyReport(record.vm, fetched.source, "files", label=record.label)
    problems = []
    for disk in (d for d in record.disks if not d.flash):
        trees = filesystems(fetched.listing, disk.device)
        if not trees:
            problems.append(f"disk {disk.device} of the record has no tree in the archive")
        for where, (files, total) in sorted(trees.items()):
            report.checked.append(f"{where}: {files} files, {total / 2**20:.1f} MiB")
            if files == 0:
                problems.append(f"{where} is empty")
    for marker in settings.files:
        if fetched.listing.get(marker, -1) < 0:
            problems.append(f"marker file {marker} is missing")
        else:
            report.checked.append(f"marker {marker}: present")
    if problems:
        report.reason, report.failed = "; ".join(problems), True
    elif record.label != "clean":
        report.reason = f"the backup is {record.label}: complete, but not proven consistent"
    return report
