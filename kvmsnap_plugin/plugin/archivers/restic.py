"""The restic archiver (a built-in plugin), driven through ``sh``.

files: ``restic backup`` of the mounted trees, tagged ``kvmsnap`` and ``vm:NAME``, with the
VM's name as host. restic records absolute paths, so the mount root is stable per VM (see
ForkOptions.mount_root) and later snapshots find their parent.

image: one snapshot per disk through ``--stdin --stdin-filename DISK.raw`` (restic 0.14 has no
``--stdin-from-command``). ``nbdcopy`` streams the disk from its NBD export into restic's
stdin (stream.py); without NBD, kvmsnap copies the disk's FUSE view itself. Either way
restic's stdin is closed only after the last byte was read: if reading fails, restic is
killed *before* it sees end-of-file, so it never saves a partial snapshot. The snapshots of
the files beside the disks (the VM record, a UEFI variable store) are started before the
disks and ended after them (:func:`backup_images`).

The password comes only from the environment (RESTIC_PASSWORD, RESTIC_PASSWORD_FILE,
RESTIC_PASSWORD_COMMAND, or the target's ``env`` table).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import ArchiveError, ProcessError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.secrets import hide_url_passwords
from kvmsnap_plugin.model import (
    METADATA_FILE,
    ArchiveResult,
    ArchiveTarget,
    BackupJob,
    ExposedDisk,
    Exposure,
    VmRecord,
)
from kvmsnap_plugin.plugin.archive import mounted_trees
from kvmsnap_plugin.plugin.archivers import stream
from kvmsnap_plugin.plugin.hookspecs import hookimpl

TYPE = "restic"
OPTIONS = frozenset({"repository", "tags", "host", "timeout", "options"})
PASSWORD_ENV = ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND")
DEFAULT_TIMEOUT = 24 * 3600.0
CHUNK = 4 << 20
#: restic's stdin pipe: 1 MiB instead of 64 KiB (2.0 s less per 2 GiB disk, issue #15)
PIPE_SIZE = 1 << 20
#: restic's exit code 3: a snapshot was made, but some files could not be read
INCOMPLETE = 3


@hookimpl
def kvmsnap_archiver_types() -> dict[str, frozenset[str]]:
    return {TYPE: OPTIONS}


@hookimpl
def kvmsnap_pre_backup(job: BackupJob) -> None:
    """Before the VM is touched: restic is there, and each repository opens (password)."""
    for target in job.targets:
        if target.type == TYPE:
            try:
                _restic(target).run([*_repository_args(target), "cat", "config"])
            except ProcessError as exc:
                raise _explain(exc, target) from None


@hookimpl
def kvmsnap_archive(job: BackupJob, target: ArchiveTarget, exposure: Exposure,
                    label: str) -> list[ArchiveResult] | None:
    if target.type != TYPE:
        return None
    restic = _restic(target)
    tags = ["kvmsnap", f"vm:{job.name}", f"state:{label}", *_run_tag(exposure),
            *map(str, target.option("tags", []))]
    results = []
    if target.mode in ("files", "both"):
        results.append(backup_files(restic, target, job, exposure, tags))
    if target.mode in ("image", "both"):
        results += backup_images(restic, target, job, exposure, tags)
    return results


@dataclass
class _FileRun:
    """A restic run of a file beside the disks, waiting for its end of file."""

    name: str
    running: Any
    write_end: int | None  # None once closed

    def close(self) -> None:
        """Its end of file: restic saves the snapshot now (or already died)."""
        if self.write_end is not None:
            os.close(self.write_end)
            self.write_end = None


def backup_images(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob,
                  exposure: Exposure, tags: list[str]) -> list[ArchiveResult]:
    """A snapshot per disk, and one per small file beside them (the VM record).

    Each restic run spends ~0.7 s opening the repository (key derivation, index) before it
    reads a byte. The files' runs start first, their bytes go into their pipes (a file
    larger than its pipe waits for restic to read), and they open the repository while the
    disks go. Their pipes are closed (end of file) only once every disk was saved: a run
    that failed part way still leaves no VM record, which is what tells restore that it is
    incomplete. A file's seconds are those it took after the disks; its timeout spans them."""
    program = stream.producer(exposure.disks)
    patient = _restic(target, runs=len(exposure.disks) + 1)
    files: list[_FileRun] = []
    try:
        for name in exposure.extra_files:
            files.append(_start_file(patient, target, job, exposure, name, tags))
        results = []
        for disk in exposure.disks:
            results.append(backup_stream(restic, target, job, disk, tags, program) if program
                           else backup_image(restic, target, job, disk.name, disk.image, tags))
            for run in files:
                if not run.running.is_alive():  # it failed before its end of file: say now
                    run.close()
                    _finish(patient, run.running, target, run.name, "metadata", 0.0)
        for run in files:
            closed = time.monotonic()
            run.close()
            results.append(_finish(patient, run.running, target, run.name, "metadata",
                                   closed))
        return results
    finally:
        _kill_unended(patient, files)


def _start_file(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob,
                exposure: Exposure, name: str, tags: list[str]) -> _FileRun:
    running, write_end = _start_stdin(restic, target, job, name, tags, filename=name)
    run = _FileRun(name, running, write_end)
    try:
        _feed(exposure.images_dir / name, write_end)
    except BrokenPipeError:
        pass  # restic died: its error comes at the latest after the next disk
    except BaseException:
        _kill_unended(restic, [run])
        raise
    return run


def _kill_unended(restic: process.ShProgram, files: list[_FileRun]) -> None:
    """Every run not given its end of file is killed before it could see one (no snapshot
    of a partial backup): all of them first, then their pipes closed and they are reaped."""
    unended = [run for run in files if run.write_end is not None]
    try:
        for run in unended:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.running.pid, signal.SIGKILL)
    finally:
        for run in unended:
            run.close()
        for run in unended:
            restic.abort(run.running)


def _run_tag(exposure: Exposure) -> list[str]:
    """``run:ID``: one backup's snapshots (one per disk, plus metadata) belong together."""
    path = exposure.images_dir / METADATA_FILE
    if METADATA_FILE not in exposure.extra_files or not path.exists():
        return []
    return [f"run:{VmRecord.from_json(path.read_bytes()).run}"]


def _restic(target: ArchiveTarget, runs: int = 1) -> process.ShProgram:
    """restic for ``target``; its timeout is the target's times ``runs`` (a run that waits
    through others)."""
    env = dict(target.option("env", {}))
    if not any(os.environ.get(k) or env.get(k) for k in PASSWORD_ENV):
        raise ArchiveError("restic needs the repository password",
                           "set RESTIC_PASSWORD_FILE (or RESTIC_PASSWORD) in the environment")
    if not target.option("repository"):
        raise ArchiveError(f"archiver {target.name} has no repository",
                           "set repository = \"/path/or/sftp:...\" (or --restic REPO)")
    return process.ShProgram("restic", "restic", env=env,
                             timeout=runs * float(target.option("timeout", DEFAULT_TIMEOUT)))


def _repository_args(target: ArchiveTarget) -> list[str]:
    """``-r REPO`` and the target's ``options`` as restic's ``-o KEY=VALUE`` (every call
    needs them: e.g. ``sftp.command`` naming the ssh key and port of a remote repository)."""
    args = ["-r", str(target.option("repository"))]
    for option in target.option("options", []):
        args += ["-o", str(option)]
    return args


def _common(target: ArchiveTarget, job: BackupJob, tags: list[str]) -> list[str]:
    args = [*_repository_args(target), "backup", "--json",
            "--host", str(target.option("host", job.name))]
    for tag in tags:
        args += ["--tag", tag]
    return args + [str(a) for a in target.option("extra_args", [])]


def backup_files(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob,
                 exposure: Exposure, tags: list[str]) -> ArchiveResult:
    started = time.monotonic()
    args = [*_common(target, job, [*tags, "files"]), *mounted_trees(exposure)]
    try:
        done = restic.run(args, cwd=exposure.root, ok_codes=(0, INCOMPLETE))
    except ProcessError as exc:
        raise _explain(exc, target) from None
    summary = _summary(done.stdout)
    warnings = ("restic could not read some files",) if done.returncode == INCOMPLETE else ()
    return ArchiveResult(target.name, TYPE, "files", summary.get("snapshot_id", ""),
                         str(exposure.root), int(summary.get("total_bytes_processed", 0)),
                         summary.get("data_added"), time.monotonic() - started, warnings)


def backup_image(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob,
                 disk: str, image: Path, tags: list[str],
                 filename: str | None = None) -> ArchiveResult:
    """One disk (or file) as a raw stream (``DISK.raw``) that kvmsnap copies into restic;
    no snapshot survives a failed read."""
    started = time.monotonic()
    running, write_end = _start_stdin(restic, target, job, disk, tags, filename)
    try:
        _feed(image, write_end)
    except BrokenPipeError:
        pass  # restic exited early: its own error below says why
    except BaseException:
        # Kill restic while its stdin is still open: it must not mistake a broken stream
        # for the end of the disk and save a truncated snapshot.
        restic.abort(running)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)
    return _finish(restic, running, target, disk, "metadata" if filename else "image", started)


def backup_stream(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob,
                  disk: ExposedDisk, tags: list[str], program: str) -> ArchiveResult:
    """One disk streamed by ``nbdcopy`` from its NBD export into restic (stream.py); no
    snapshot survives a failed read."""
    started = time.monotonic()
    running, write_end = _start_stdin(restic, target, job, disk.name, tags)
    with stream.Streams(program) as streams:
        streams.start(disk, write_end)  # restic sees EOF once the whole disk went through
        try:
            streams.wait(running.is_alive)
        except ArchiveError:
            if not running.is_alive():  # restic died first (nbdcopy then lost its reader)
                _finish(restic, running, target, disk.name, "image", started)
            restic.abort(running)  # still reading: killed before it sees EOF
            raise
        except BaseException:
            restic.abort(running)
            raise
    return _finish(restic, running, target, disk.name, "image", started)


def _start_stdin(restic: process.ShProgram, target: ArchiveTarget, job: BackupJob, disk: str,
                 tags: list[str], filename: str | None = None) -> tuple[Any, int]:
    """restic reading a new pipe as ``DISK.raw``; returns it and the pipe's write end."""
    args = [*_common(target, job, [*tags, "image", f"disk:{disk}"]),
            "--stdin", "--stdin-filename", filename or f"{disk}.raw"]
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    try:
        running = restic.start(args, stdin_fd=read_end)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)  # restic has its own copy; ours would hide its death from us
    return running, write_end


def _finish(restic: process.ShProgram, running: Any, target: ArchiveTarget, disk: str,
            kind: str, started: float) -> ArchiveResult:
    try:
        done = restic.finish(running)
    except ProcessError as exc:
        raise _explain(exc, target) from None
    summary = _summary(done.stdout)
    return ArchiveResult(target.name, TYPE, kind, summary.get("snapshot_id", ""), disk,
                         int(summary.get("total_bytes_processed", 0)),
                         summary.get("data_added"), time.monotonic() - started)


def _feed(image: Path, write_end: int) -> int:
    """Copy the whole disk into the pipe; raise on any read error."""
    copied = 0
    try:
        with open(image, "rb", buffering=0) as source:
            while chunk := source.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_end, view):]
                copied += len(chunk)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise ArchiveError(f"reading disk image {image.name} failed after {copied} bytes: "
                           f"{exc.strerror or exc}", "no snapshot was saved; check the "
                           "host's logs and run the backup again") from None
    return copied


def _summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if message.get("message_type") == "summary":
                return message
    return {}


def _explain(exc: ProcessError, target: ArchiveTarget) -> ArchiveError:
    text, repository = exc.stderr, hide_url_passwords(str(target.option("repository")))
    # The Fatal line is the cause; restic may print more after it (a lock it could not
    # remove) and may not start it on a line of its own. Before it may come retries that
    # name the config file (a server gone mid-backup): they are not the cause.
    fatal = text[text.rindex("Fatal:"):].splitlines()[0] if "Fatal:" in text else ""
    cause = fatal or text
    if "wrong password" in cause:
        return ArchiveError(f"restic: wrong password for {repository}",
                            "check RESTIC_PASSWORD / RESTIC_PASSWORD_FILE")
    if "unable to open config file" in cause or (
            not fatal and "Is there a repository at the following location?" in text):
        return ArchiveError(f"restic: no repository at {repository}",
                            f"create it first: restic init -r {repository}")
    if fatal:
        return ArchiveError(f"restic backup failed: {fatal}", exc.hint)
    return ArchiveError(f"restic backup failed: {exc}", exc.hint)
