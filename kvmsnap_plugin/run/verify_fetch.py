"""What ``kvmsnap verify`` reads from a repository: the VM record, and the disks or the
file listing of one backup.

An image archive's disks become sparse raw files in the private work directory (only the
blocks the guest wrote take space: ``borg extract --sparse``; ``restic dump`` streamed into
the image as restore does it, :func:`kvmsnap_plugin.run.restore_stream.write_image`); the
booted copy runs on qcow2 overlays over them, so nothing of the archive is copied twice. A
files archive is never extracted: its listing (``borg list``) tells which filesystems and
files it holds.
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError, UsageError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import METADATA_FILE, VmRecord
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.run.restore import _record, _restic_snapshots
from kvmsnap_plugin.run.restore_stream import write_image

log = logging.getLogger(__name__)

TIMEOUT = 24 * 3600.0


@dataclass
class Fetched:
    """One backup as verify sees it."""

    record: VmRecord
    source: str
    mode: str  # "image": ``images`` holds every disk; "files": ``listing`` the archive
    images: dict[str, Path] = field(default_factory=dict)  # device -> sparse raw file
    listing: dict[str, int] = field(default_factory=dict)  # path -> size (files, dirs: -1)

    @property
    def allocated(self) -> int:
        """Bytes the materialised images take on disk (they are sparse)."""
        return sum(p.stat().st_blocks * 512 for p in self.images.values())


def raw_name(device: str) -> str:
    return f"{safe_name(device)}.raw"


def fetch_borg(archive: str, work: Path) -> Fetched:
    """``REPO::ARCHIVE``: its record, then its disks (image) or its listing (files)."""
    if "::" not in archive:
        raise UsageError(f"{archive!r} names no archive",
                         "pass REPO::ARCHIVE (see `borg list REPO`)")
    borg = process.find_program("borg", "borgbackup")
    listing = _borg_listing(borg, archive)
    _borg_run([borg, "extract", archive, METADATA_FILE], work, f"{archive} has no "
              f"{METADATA_FILE}" if METADATA_FILE not in listing else "")
    record = _record_at(work / METADATA_FILE, archive)
    wanted = [raw_name(d.device) for d in record.disks]
    if not all(name in listing for name in wanted):
        return Fetched(record, archive, "files", listing=listing)
    log.info("extracting the disks of %s (sparse)", archive)
    _borg_run([borg, "extract", "--sparse", archive, *wanted], work)
    return Fetched(record, archive, "image",
                   images={d.device: work / raw_name(d.device) for d in record.disks})


def _borg_listing(borg: str, archive: str) -> dict[str, int]:
    try:
        out = process.run([borg, "list", "--json-lines", archive], timeout=TIMEOUT).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"borg list failed: {exc}", exc.hint) from None
    items = (json.loads(line) for line in out.splitlines() if line.strip())
    return {i["path"].strip("/"): int(i.get("size", 0)) if i.get("type") == "-" else -1
            for i in items}


def _borg_run(argv: list[str], cwd: Path, missing: str = "") -> None:
    if missing:
        raise ArchiveError(f"{missing}: not a kvmsnap backup",
                           "pick an archive kvmsnap made (see `borg list REPO`)")
    try:
        process.run(argv, timeout=TIMEOUT, cwd=cwd)
    except process.ProcessError as exc:
        raise ArchiveError(f"borg extract failed: {exc}", exc.hint) from None


def fetch_restic(repository: str, work: Path, run: str | None = None,
                 vm: str | None = None) -> Fetched:
    """One backup (``run``, default the latest, optionally of ``vm``) of restic: its image
    snapshots, or its files snapshot if it has none."""
    restic = process.ShProgram("restic", "restic", timeout=TIMEOUT)
    try:
        snapshots = _restic_snapshots(restic, repository, run, vm)
    except (ArchiveError, UsageError) as no_image:  # a files-only backup, perhaps
        return _restic_files(restic, repository, work, run, vm, no_image)
    run = next(t[4:] for t in snapshots[0].get("tags", []) if t.startswith("run:"))
    source = f"{repository} run {run}"

    def snapshot_of(name: str) -> str:
        found = next((s["id"] for s in snapshots if f"/{name}" in s["paths"]), None)
        if found is None:
            raise ArchiveError(f"{source} has no snapshot of {name}",
                               "was it made with --mode image or both?")
        return found

    record = _record(_restic_text(restic, repository, snapshot_of(METADATA_FILE),
                                  METADATA_FILE), source)
    images = {}
    for disk in record.disks:
        name = raw_name(disk.device)
        log.info("reading %s from restic (sparse)", name)
        images[disk.device] = write_image(
            [restic.path, "-r", repository, "dump", snapshot_of(name), f"/{name}"],
            work / name, "raw", disk.virtual_size, timeout=TIMEOUT)
    return Fetched(record, source, "image", images=images)


def _restic_files(restic: process.ShProgram, repository: str, work: Path, run: str | None,
                  vm: str | None, no_image: Exception) -> Fetched:
    """The files snapshot of ``run`` (default the latest), as a listing under its root
    (where ``kvmsnap-vm.json`` lies beside the disks' trees)."""
    tags = "kvmsnap,files" + (f",vm:{vm}" if vm else "")
    try:
        found = json.loads(restic.run(["-r", repository, "snapshots", "--json", "--tag",
                                       tags]).stdout or "[]")
    except process.ProcessError as exc:
        raise ArchiveError(f"restic snapshots failed: {exc}", exc.hint) from None
    found = [s for s in sorted(found, key=lambda s: s["time"], reverse=True)
             if run is None or f"run:{run}" in s.get("tags", [])]
    if not found:
        raise no_image
    snapshot = found[0]["id"]
    source = f"{repository} files snapshot {snapshot[:8]}"
    try:
        out = restic.run(["-r", repository, "ls", "--json", snapshot]).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"restic ls failed: {exc}", exc.hint) from None
    nodes = [n for n in map(json.loads, filter(str.strip, out.splitlines()))
             if n.get("struct_type") == "node"]
    meta = next((n["path"] for n in nodes if n["path"].endswith(f"/{METADATA_FILE}")), None)
    if meta is None:
        raise ArchiveError(f"{source} holds no {METADATA_FILE}: not a kvmsnap backup",
                           "pick a snapshot kvmsnap made (restic snapshots --tag kvmsnap)")
    root = meta[:-len(METADATA_FILE)]
    record = _record(_restic_text(restic, repository, snapshot, meta.lstrip("/")), source)
    listing = {n["path"][len(root):]: int(n.get("size", 0)) if n.get("type") == "file"
               else -1 for n in nodes if n["path"].startswith(root)}
    return Fetched(record, source, "files", listing=listing)


def _restic_text(restic: process.ShProgram, repository: str, snapshot: str,
                 name: str) -> str:
    """A small file of a snapshot (the VM record), as text."""
    try:
        return restic.run(["-r", repository, "dump", snapshot, f"/{name}"]).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"restic dump of {name} failed: {exc}",
                           "check the repository with `restic check`") from None


def _record_at(path: Path, source: str) -> VmRecord:
    """The VM record extracted to ``path`` (restore's parser: an empty text says none)."""
    return _record(path.read_text() if path.is_file() else "", source)


def latest_borg_archive(repository: str, template: str, vm: str, kind: str) -> str:
    """``REPO::ARCHIVE`` of the newest ``kind`` ("image" or "files") archive of ``vm``: the
    newest whose name its target's ``archive_name`` template could have made."""
    pattern = archive_pattern(template, vm, kind)
    borg = process.find_program("borg", "borgbackup")
    try:
        out = process.run([borg, "list", "--json", repository], timeout=TIMEOUT).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"borg list failed: {exc}", exc.hint) from None
    archives = sorted(json.loads(out).get("archives", []), key=lambda a: a.get("time", ""))
    names = [a["name"] for a in archives if pattern.fullmatch(a["name"])]
    if not names:
        raise ArchiveError(f"{repository} holds no {kind} archive of {vm} (none matches "
                           f"{pattern.pattern})", "back the VM up first, or name one: "
                           "kvmsnap verify --borg REPO::ARCHIVE")
    return f"{repository}::{names[-1]}"


def archive_pattern(template: str, vm: str, kind: str) -> re.Pattern[str]:
    """What ``ArchiveTarget.archive_name`` makes of ``template`` for ``vm`` and ``kind``,
    at any time: ``{now:%Y-%m-%d}`` matches digits where strftime writes numbers, so
    ``web-...`` never matches the archives of a VM named ``web-2``."""
    regex = ""
    for literal, name, spec, _conversion in string.Formatter().parse(template):
        regex += re.escape(literal)
        if name == "now":
            regex += "".join(_strftime_regex(part) for part in
                             re.split(r"(%.)", spec)) if spec else ".+"
        elif name is not None:
            regex += re.escape({"vm": vm, "mode": kind}.get(name, ""))
    return re.compile(regex if "{mode}" in template else f"{regex}-{re.escape(kind)}")


def _strftime_regex(part: str) -> str:
    if not part.startswith("%") or len(part) != 2:
        return re.escape(part)
    return r"\d+" if part[1] in "CdeGgHIjmMSsUuVWwYyf" else r"[^/]+?"
