"""`kvmsnap restore`: an image-level archive back into bootable disk images.

From borg, an image archive (``NAME-image``) holds every disk as ``DISK.raw`` plus the
VM's metadata (``kvmsnap-vm.json``); from restic, one backup is a set of snapshots tagged
``run:ID``: one per disk and one for the metadata. A UEFI guest's variable store is one of
its disks, marked ``flash`` in the record. Either way the disks come back in the format
they had (qcow2 or raw, sparse, with no backing file: the VARS store raw, as pflash wants
it), next to a note that says how to boot them: the VM's own command line with its disks
replaced by the restored images.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError, UsageError
from kvmsnap_plugin.host import dirs, images, process
from kvmsnap_plugin.model import METADATA_FILE, VmRecord
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.vm.qemu_args import escape

log = logging.getLogger(__name__)

NOTE = "HOW-TO-BOOT.txt"
#: options of the original command line that belong to the running original alone
PARENT_ONLY = {"-daemonize": 0, "-pidfile": 1, "-incoming": 1, "-S": 0}


@dataclass(frozen=True)
class RestoredDisk:
    device: str
    path: str
    original: str
    format: str
    flash: bool = False  # the UEFI variable store: boot it as pflash (raw), as before


@dataclass(frozen=True)
class Restored:
    vm: str
    taken_at: str
    label: str
    disks: list[RestoredDisk]
    argv: list[str]  # the VM's command line, on the restored disks
    note: str

    def render(self) -> str:
        lines = [f"restored {self.vm} as backed up at {self.taken_at} ({self.label}):"]
        lines += [f"  {d.device}: {d.path}" for d in self.disks]
        lines.append(f"how to boot it: {self.note}")
        return "\n".join(lines)


def restore_borg(archive: str, to: Path) -> Restored:
    """Restore ``REPO::ARCHIVE`` (an image archive) into ``to``."""
    if "::" not in archive:
        raise UsageError(f"{archive!r} names no archive",
                         "pass REPO::ARCHIVE (see `borg list REPO` for ...-image archives)")
    target = _target(to)
    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        work = Path(tmp)
        log.info("extracting %s", archive)
        try:
            process.run([process.find_program("borg", "borgbackup"), "extract", "--sparse",
                         archive], timeout=24 * 3600, cwd=work)
        except process.ProcessError as exc:
            raise ArchiveError(f"borg extract failed: {exc}", exc.hint) from None
        record = _record(work / METADATA_FILE, archive)
        disks = [_materialize(work / f"{safe_name(d.device)}.raw", d, target)
                 for d in record.disks]
    return _finish(record, disks, target)


def restore_restic(repository: str, to: Path, run: str | None = None,
                   vm: str | None = None) -> Restored:
    """Restore one backup (``run``, default the latest, optionally of ``vm``) into ``to``."""
    restic = process.ShProgram("restic", "restic", timeout=24 * 3600)
    snapshots = _restic_snapshots(restic, repository, run, vm)
    target = _target(to)
    with tempfile.TemporaryDirectory(dir=target, prefix=".extract-") as tmp:
        work = Path(tmp)
        meta = next((s for s in snapshots if f"/{METADATA_FILE}" in s["paths"]), None)
        if meta is None:
            raise ArchiveError(f"run {run} has no {METADATA_FILE} snapshot",
                               "restore the disks by hand with `restic dump`")
        _dump(restic, repository, meta["id"], f"/{METADATA_FILE}", work / METADATA_FILE)
        record = _record(work / METADATA_FILE, f"{repository} run {run}")
        disks = []
        for disk in record.disks:
            name = f"{safe_name(disk.device)}.raw"
            snapshot = next((s for s in snapshots if f"/{name}" in s["paths"]), None)
            if snapshot is None:
                raise ArchiveError(f"the backup has no snapshot of disk {disk.device}",
                                   "was it made with --mode image or both?")
            _dump(restic, repository, snapshot["id"], f"/{name}", work / name)
            disks.append(_materialize(work / name, disk, target))
    return _finish(record, disks, target)


def _restic_snapshots(restic: process.ShProgram, repository: str, run: str | None,
                      vm: str | None) -> list[dict]:
    args = ["-r", repository, "snapshots", "--json", "--tag", "kvmsnap,image"]
    if vm:
        args[-1] += f",vm:{vm}"
    try:
        found = json.loads(restic.run(args).stdout or "[]")
    except process.ProcessError as exc:
        raise ArchiveError(f"restic snapshots failed: {exc}", exc.hint) from None
    runs = {t[4:] for s in found for t in s.get("tags", []) if t.startswith("run:")}
    if not runs:
        raise ArchiveError(f"no kvmsnap image backups in {repository}",
                           "back up with --mode image (or both) first")
    if run is None:
        run = next(t[4:] for s in sorted(found, key=lambda s: s["time"], reverse=True)
                   for t in s.get("tags", []) if t.startswith("run:"))
    elif run not in runs:
        raise UsageError(f"no backup run {run} in {repository}",
                         f"known runs: {', '.join(sorted(runs))}")
    return [s for s in found if f"run:{run}" in s.get("tags", [])]


def _dump(restic: process.ShProgram, repository: str, snapshot: str, path: str,
          dest: Path) -> None:
    log.info("restoring %s from snapshot %s", path, snapshot[:8])
    with open(dest, "wb") as out:
        try:
            restic.run_to_file(["-r", repository, "dump", snapshot, path], out)
        except process.ProcessError as exc:
            raise ArchiveError(f"restic dump failed: {exc}", exc.hint) from None


def _target(to: Path) -> Path:
    dirs.user_dir(to, "the restore directory")
    if any(p.name != NOTE and not p.name.startswith(".") for p in to.iterdir()):
        raise UsageError(f"{to} is not empty", "restore into an empty directory")
    return to.resolve()


def _record(path: Path, source: str) -> VmRecord:
    if not path.exists():
        raise ArchiveError(f"{source} holds no {METADATA_FILE}: not a kvmsnap image backup",
                           "pick an archive made by kvmsnap with --mode image or both")
    return VmRecord.from_json(path.read_bytes())


def _materialize(raw: Path, disk, target: Path) -> RestoredDisk:
    """The raw disk, in its original format, sparse and standalone."""
    if not raw.exists():
        raise ArchiveError(f"the archive has no image of disk {disk.device}",
                           "was it made with --mode image or both?")
    fmt = disk.format if disk.format in ("qcow2", "raw") else "qcow2"
    dest = images.convert(raw, "raw", target / f"{safe_name(disk.device)}.{fmt}", fmt,
                          timeout=24 * 3600)  # 0600: the guest's data
    raw.unlink()
    return RestoredDisk(disk.device, str(dest), disk.image, fmt, disk.flash)


def boot_argv(record: VmRecord, disks: list[RestoredDisk]) -> list[str]:
    """The VM's command line with its disks replaced by the restored images."""
    argv, skip = [], 0
    for arg in record.argv:
        if skip:
            skip -= 1
            continue
        if arg in PARENT_ONLY:
            skip = PARENT_ONLY[arg]
            continue
        for disk in disks:  # key=value option strings write a comma as two
            arg = (arg.replace(escape(disk.original), escape(disk.path)) if "=" in arg
                   else arg.replace(disk.original, disk.path))
        argv.append(arg)
    return argv


def _finish(record: VmRecord, disks: list[RestoredDisk], target: Path) -> Restored:
    argv = boot_argv(record, disks)
    dirs.replace_file(target / METADATA_FILE, record.to_json())
    dirs.replace_file(target / "boot-argv.json", json.dumps(argv, indent=1).encode())
    note = target / NOTE
    dirs.replace_file(note, "\n".join([
        f"kvmsnap restored the VM {record.vm!r} as backed up at {record.taken_at}",
        f"({record.label}, RAM snapshot by {record.method}).", "",
        "Disks:",
        *(f"  {d.device}: {d.path}  (was {d.original}, {d.format}"
          f"{', the UEFI variable store (pflash)' if d.flash else ''})" for d in disks), "",
        "To boot it, run the VM's own QEMU command line with its disks replaced by these",
        "images (boot-argv.json holds it as a list). Check its kernel, firmware, socket,",
        "serial and network options first: they are the original VM's, which may still run.",
        "", "  " + shlex.join(argv), ""]).encode())
    log.info("restored %d disk(s) of %s into %s", len(disks), record.vm, target)
    return Restored(record.vm, record.taken_at, record.label, disks, argv, str(note))
