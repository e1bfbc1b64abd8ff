"""`kvmsnap restore`: an image-level archive back into bootable disk images.

From borg, an image archive (``NAME-image``) holds every disk as ``DISK.raw`` plus the
VM's metadata (``kvmsnap-vm.json``); from restic, one backup is a set of snapshots tagged
``run:ID``: one per disk and one for the metadata. A UEFI guest's variable store is one of
its disks, marked ``flash`` in the record. Either way each disk is streamed from the
archiver straight into its image (restore_stream.py: no raw copy first, so the restore
needs no more room than the restored disks), in the format it had or ``--format``'s
(sparse, with no backing file; the VARS store raw, as pflash wants it), next to a note that
says how to boot them: the VM's own command line with its disks replaced by the restored
images, and for a libvirt domain its definition rewritten for the copy (restore_libvirt.py).
Nothing is written before every refusal (restore_guard.py) has been checked.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError, UsageError
from kvmsnap_plugin.host import dirs, process
from kvmsnap_plugin.model import METADATA_FILE, RecordedDisk, VmRecord
from kvmsnap_plugin.model.defaults import DEFAULT_LIBVIRT_URI
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.run.restore_guard import checked_target, refuse_images_in_use
from kvmsnap_plugin.run.restore_libvirt import DomainPlan, define, plan_domain, write_domain
from kvmsnap_plugin.run.restore_stream import write_image
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
    domain: str | None = None  # a libvirt VM's restored name
    domain_xml: str | None = None  # its definition (domain.xml in the restore directory)
    defined: bool = False  # --define: libvirt knows it
    started: bool = False  # --start: and it runs

    def render(self) -> str:
        lines = [f"restored {self.vm} as backed up at {self.taken_at} ({self.label}):"]
        lines += [f"  {d.device}: {d.path}" for d in self.disks]
        if self.domain:
            state = "started" if self.started else "defined" if self.defined else "written"
            lines.append(f"libvirt domain {self.domain}: {state} ({self.domain_xml})")
        lines.append(f"how to boot it: {self.note}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RestoreOptions:
    """How and where: ``kvmsnap restore``'s options besides the archive and ``--to``."""

    format: str | None = None  # raw or qcow2; None: each disk's own (a flash stays raw)
    disks: tuple[str, ...] = ()  # only these devices (none: all)
    force: bool = False  # overwrite a non-empty directory / a shut-off domain's definition
    name: str | None = None  # a libvirt VM's restored name (default <vm>-restored)
    define: bool = False  # define the restored domain in libvirt
    start: bool = False  # and boot it
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    plug_nics: bool = False  # keep the restored domain's NICs connected
    in_place: bool = False  # over the VM's own images (shut off, with force)


def restore_borg(archive: str, to: Path, options: RestoreOptions = RestoreOptions()) -> Restored:
    """Restore ``REPO::ARCHIVE`` (an image archive) into ``to``."""
    if "::" not in archive:
        raise UsageError(f"{archive!r} names no archive",
                         "pass REPO::ARCHIVE (see `borg list REPO` for ...-image archives)")
    target = checked_target(to, options.force, keep=(NOTE,))
    borg = process.find_program("borg", "borgbackup")
    try:
        text = process.run([borg, "extract", "--stdout", archive, METADATA_FILE],
                           timeout=600).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"borg extract failed: {exc}", exc.hint) from None
    record = _record(text, archive)
    return _restore(record, target, options,
                    lambda disk: [borg, "extract", "--stdout", archive, _raw_name(disk)])


def restore_restic(repository: str, to: Path, run: str | None = None, vm: str | None = None,
                   options: RestoreOptions = RestoreOptions()) -> Restored:
    """Restore one backup (``run``, default the latest, optionally of ``vm``) into ``to``."""
    restic = process.ShProgram("restic", "restic", timeout=24 * 3600)
    snapshots = _restic_snapshots(restic, repository, run, vm)
    target = checked_target(to, options.force, keep=(NOTE,))
    meta = _snapshot_of(snapshots, METADATA_FILE)
    if meta is None:
        raise ArchiveError(f"run {run} has no {METADATA_FILE} snapshot",
                           "restore the disks by hand with `restic dump`")
    try:
        text = restic.run(["-r", repository, "dump", meta["id"], f"/{METADATA_FILE}"]).stdout
    except process.ProcessError as exc:
        raise ArchiveError(f"restic dump failed: {exc}", exc.hint) from None
    record = _record(text, f"{repository} run {run}")

    def dump(disk: RecordedDisk) -> list[str]:
        snapshot = _snapshot_of(snapshots, _raw_name(disk))
        if snapshot is None:
            raise ArchiveError(f"the backup has no snapshot of disk {disk.device}",
                               "was it made with --mode image or both?")
        return [restic.path, "-r", repository, "dump", snapshot["id"], f"/{_raw_name(disk)}"]

    return _restore(record, target, options, dump)


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
        run = _latest_complete_run(found)
    elif run not in runs:
        raise UsageError(f"no backup run {run} in {repository}",
                         f"known runs: {', '.join(sorted(runs))}")
    return [s for s in found if f"run:{run}" in s.get("tags", [])]


def _latest_complete_run(found: list[dict]) -> str:
    """The newest run that has its VM record: kvmsnap lets restic save the record's
    snapshot only once every disk's was saved, so a run whose repository went away half way
    has none and is passed over (with a warning: `restic forget --tag run:ID` removes its
    disks' snapshots)."""
    newest_first = sorted(found, key=lambda s: s["time"], reverse=True)
    runs = list(dict.fromkeys(t[4:] for s in newest_first for t in s.get("tags", [])
                              if t.startswith("run:")))
    for run in runs:
        mine = [s for s in found if f"run:{run}" in s.get("tags", [])]
        if _snapshot_of(mine, METADATA_FILE) is not None:
            return run
        log.warning("run %s is incomplete (no %s snapshot): restoring an older one",
                    run, METADATA_FILE)
    return runs[0]  # none is complete: the newest, which then fails naming what is missing


def _record(text: str, source: str) -> VmRecord:
    if not text.strip():
        raise ArchiveError(f"{source} holds no {METADATA_FILE}: not a kvmsnap image backup",
                           "pick an archive made by kvmsnap with --mode image or both")
    return VmRecord.from_json(text)


def _snapshot_of(snapshots: list[dict], name: str) -> dict | None:
    return next((s for s in snapshots if f"/{name}" in s["paths"]), None)


def _raw_name(disk: RecordedDisk) -> str:
    return f"{safe_name(disk.device)}.raw"


def _restore(record: VmRecord, target: Path, options: RestoreOptions,
             source: Callable[[RecordedDisk], list[str]]) -> Restored:
    """Check everything that can be refused, then stream each chosen disk into place."""
    chosen = _chosen(record, options.disks)
    planned = ([(d, _own_image(d, options)) for d in chosen] if options.in_place else
               [(d, target / f"{safe_name(d.device)}.{_format(d, options)}") for d in chosen])
    refuse_images_in_use(path for _d, path in planned)
    domain = plan_domain(record.vm, record.domain_xml, options.name,
                         options.define or options.start, options.libvirt_uri, options.force)
    disks = []
    for disk, dest in planned:
        argv = source(disk)
        log.info("restoring disk %s into %s", disk.device, dest)
        write_image(argv, dest, dest.suffix[1:], disk.virtual_size, timeout=24 * 3600)
        disks.append(RestoredDisk(disk.device, str(dest), disk.image, dest.suffix[1:],
                                  disk.flash))
    return _finish(record, disks, target, domain, options)


def _chosen(record: VmRecord, devices: Sequence[str]) -> list[RecordedDisk]:
    known = [d.device for d in record.disks]
    unknown = [d for d in devices if d not in known]
    if unknown:
        raise UsageError(f"the backup of {record.vm} has no disk {', '.join(unknown)}",
                         f"its disks: {', '.join(known)}")
    return [d for d in record.disks if not devices or d.device in devices]


def _own_image(disk: RecordedDisk, options: RestoreOptions) -> Path:
    """``--in-place``: the disk's image as recorded, written over in its own format."""
    if options.define or options.start or options.format:
        raise UsageError("--in-place restores the VM's own images for its own definition",
                         "drop --define, --start and --format, or restore into --to alone")
    if not options.force:
        raise UsageError(f"--in-place overwrites {disk.image}, the disk {disk.device} of "
                         "the VM backed up", "shut the VM off and pass --force as well")
    image = Path(disk.image)
    if not image.parent.is_dir():
        raise UsageError(f"{image.parent} (where {disk.device}'s image was) does not exist",
                         "create it, or restore into --to alone")
    if disk.format not in ("raw", "qcow2") or (image.exists() and not image.is_file()):
        raise UsageError(f"{disk.image} ({disk.format}) cannot be restored in place: kvmsnap "
                         "writes raw and qcow2 image files", "restore into --to, then copy "
                         "the raw image onto the device (qemu-img convert -n)")
    return image


def _format(disk: RecordedDisk, options: RestoreOptions) -> str:
    if disk.flash:
        return "raw"  # pflash wants the bare store
    return options.format or (disk.format if disk.format in ("qcow2", "raw") else "qcow2")


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


def _finish(record: VmRecord, disks: list[RestoredDisk], target: Path,
            domain: DomainPlan | None, options: RestoreOptions) -> Restored:
    argv = boot_argv(record, disks)
    dirs.replace_file(target / METADATA_FILE, record.to_json())
    dirs.replace_file(target / "boot-argv.json", json.dumps(argv, indent=1).encode())
    xml_file = None
    if domain is not None:
        xml_file, dropped = write_domain(
            domain, record.domain_xml,
            {d.device: (d.path, d.format) for d in disks if not d.flash},
            next((d.path for d in disks if d.flash), None), options.plug_nics, target)
        if dropped:
            log.warning("left out of %s (not restored, still the original's images): %s",
                        xml_file.name, ", ".join(dropped))
    note = target / NOTE
    dirs.replace_file(note, _note(record, disks, argv, domain, xml_file).encode())
    if domain is not None and domain.uri is not None and xml_file is not None:
        define(domain, xml_file, options.start)
        log.info("defined%s libvirt domain %s", " and started" if options.start else "",
                 domain.name)
    log.info("restored %d disk(s) of %s into %s", len(disks), record.vm, target)
    return Restored(record.vm, record.taken_at, record.label, disks, argv, str(note),
                    domain.name if domain else None, str(xml_file) if xml_file else None,
                    bool(domain and domain.uri), bool(domain and domain.uri and options.start))


def _note(record: VmRecord, disks: list[RestoredDisk], argv: list[str],
          domain: DomainPlan | None, xml_file: Path | None) -> str:
    lines = [
        f"kvmsnap restored the VM {record.vm!r} as backed up at {record.taken_at}",
        f"({record.label}, RAM snapshot by {record.method}).", "",
        "Disks:",
        *(f"  {d.device}: {d.path}  (was {d.original}, {d.format}"
          f"{', the UEFI variable store (pflash)' if d.flash else ''})" for d in disks), ""]
    if domain is not None:
        lines += [f"It was a libvirt domain: {xml_file} defines the copy as {domain.name!r}",
                  f"(UUID {domain.uuid}, new MAC addresses, file consoles in this directory,",
                  "NICs unplugged unless restored with --plug-nics). Boot it with:", "",
                  f"  virsh define {xml_file} && virsh start {domain.name}", ""]
    if argv:
        lines += [
            "To boot it by hand, run the VM's own QEMU command line with its disks replaced",
            "by these images (boot-argv.json holds it as a list). Check its kernel, firmware,",
            "socket, serial and network options first: they are the original VM's, which",
            "may still run.", "", "  " + shlex.join(argv), ""]
    return "\n".join(lines)
