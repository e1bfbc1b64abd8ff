"""The BorgBackup archiver (a built-in plugin), through borg's command line.

files: ``borg create`` of the mounted trees, run inside the mount root so the archive holds
``vdisk0/...`` paths. image: ``borg create --read-special`` of each disk's read-only loop
device, named ``DISK.raw`` by a symlink, with fixed-size chunks suited to disk images; borg
stores zero runs as deduplicated chunks, so sparse disks stay small. Not the FUSE view
itself: qemu-storage-daemon reports the current time as its mtime/ctime, and borg warns
"file changed while we backed it up" (exit 1) whenever a read crosses a second boundary; a
device node's timestamps do not move while it is read. borg's exit code 1 is a warning (kept
in the result), 2 and above an error. The passphrase comes only from the environment
(BORG_PASSPHRASE, BORG_PASSCOMMAND, or the target's ``env`` table).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError, KvmsnapError, ProcessError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.secrets import hide_url_passwords
from kvmsnap_plugin.model import ArchiveResult, ArchiveTarget, BackupJob, Exposure, Label, Mode
from kvmsnap_plugin.plugin.archive import mounted_trees, targets_of
from kvmsnap_plugin.plugin.hookspecs import hookimpl

TYPE = "borg"
OPTIONS = frozenset({"repository", "compression", "chunker_params", "timeout"})
IMAGE_CHUNKER = "fixed,4194304"
DEFAULT_TIMEOUT = 24 * 3600.0
#: how long borg waits for another borg's lock on the repository or its cache (borg's own
#: default is 1 s): VMs backed up at once into one repository take turns, not fail
LOCK_WAIT = ["--lock-wait", "3600"]


@hookimpl
def kvmsnap_archiver_types() -> dict[str, frozenset[str]]:
    return {TYPE: OPTIONS}


@hookimpl
def kvmsnap_pre_backup(job: BackupJob) -> None:
    """Before the VM is touched: borg is there, and each repository opens (passphrase)."""
    for target in targets_of(job, TYPE):
        _check(target)


@hookimpl
def kvmsnap_archive(job: BackupJob, target: ArchiveTarget, exposure: Exposure,
                    label: Label) -> list[ArchiveResult] | None:
    if target.type != TYPE:
        return None
    now = datetime.now()
    mode = Mode(target.mode)
    results = []
    if mode.files:
        results.append(_create(job, target, "files", target.archive_name(job.name, now, "files"),
                               exposure.root, mounted_trees(exposure), []))
    if mode.image:
        with _device_view(exposure) as (view, names):
            results.append(_create(job, target, "image",
                                   target.archive_name(job.name, now, "image"), view, names,
                                   ["--read-special", "--chunker-params",
                                    target.option("chunker_params", IMAGE_CHUNKER)]))
    return results


@contextlib.contextmanager
def _device_view(exposure: Exposure) -> Iterator[tuple[Path, list[str]]]:
    """A private directory of ``DISK.raw -> /dev/loopN`` symlinks and the extra files, so the
    archive holds ``DISK.raw`` items read from devices with stable timestamps."""
    with tempfile.TemporaryDirectory(prefix="borg-view-", dir=exposure.images_dir.parent) as tmp:
        view = Path(tmp)
        for disk in exposure.disks:
            (view / disk.image.name).symlink_to(disk.loop)
        for name in exposure.extra_files:
            shutil.copy2(exposure.images_dir / name, view / name)
        yield view, [d.image.name for d in exposure.disks] + exposure.extra_files


def _check(target: ArchiveTarget) -> None:
    """borg runs, and the repository opens with the passphrase it is given."""
    repository = _repository(target)
    try:
        process.run([process.find_program("borg", "borgbackup (pip install borgbackup)"),
                     "info", *LOCK_WAIT, "--json", repository], timeout=3900,
                    env=target.option("env", {}))
    except ProcessError as exc:
        raise _explain(exc, repository) from None


def _create(job: BackupJob, target: ArchiveTarget, kind: str, name: str, cwd: Path,
            paths: list[str], extra: list[str]) -> ArchiveResult:
    repository = _repository(target)
    name = name.replace("/", "_").replace("::", "_")  # borg forbids both in archive names
    argv = [process.find_program("borg", "borgbackup (pip install borgbackup)"), "create",
            *LOCK_WAIT, "--json", "--numeric-ids",
            "--compression", target.option("compression", "lz4"),
            *extra, *map(str, target.option("extra_args", [])),
            f"{repository}::{name}", *paths]
    started = time.monotonic()
    try:
        result = process.run(argv, timeout=float(target.option("timeout", DEFAULT_TIMEOUT)),
                             env=target.option("env", {}), cwd=cwd, ok_codes=(0, 1))
    except ProcessError as exc:
        raise _explain(exc, repository) from None
    except KvmsnapError as exc:
        raise ArchiveError(f"borg could not run: {exc}", exc.hint) from None
    stats = json.loads(result.stdout or "{}").get("archive", {}).get("stats", {})
    warnings = tuple(line for line in result.stderr.splitlines() if line.strip()) \
        if result.returncode == 1 else ()
    return ArchiveResult(target.name, TYPE, kind, name, str(cwd), int(stats.get(
        "original_size", 0)), stats.get("deduplicated_size"), time.monotonic() - started,
        warnings)


def _repository(target: ArchiveTarget) -> str:
    repository = target.option("repository")
    if not repository:
        raise ArchiveError(f"archiver {target.name} has no repository",
                           "set repository = \"/path/or/ssh://...\" (or --borg REPO)")
    return str(repository)


def _explain(exc: ProcessError, repository: str) -> ArchiveError:
    text, repository = exc.stderr.lower(), hide_url_passwords(repository)
    if "passphrase supplied" in text and "incorrect" in text:
        return ArchiveError(f"borg: wrong passphrase for {repository}",
                            "check BORG_PASSPHRASE / BORG_PASSCOMMAND")
    if "does not exist" in text or "is not a valid repository" in text:
        return ArchiveError(f"borg: no repository at {repository}",
                            f"create it first: borg init --encryption=repokey {repository}")
    if "passphrase" in text and "enter" in text:
        return ArchiveError(f"borg needs the passphrase of {repository}",
                            "set BORG_PASSPHRASE or BORG_PASSCOMMAND in the environment")
    return ArchiveError(f"borg: {exc}", exc.hint)
