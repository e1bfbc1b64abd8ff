"""A disk image written straight from an archive's stream: no raw copy on the way.

``borg extract --stdout`` / ``restic dump`` write the disk's raw bytes into a pipe;
``nbdcopy`` reads it and writes it through ``qemu-nbd`` (started by nbdcopy itself,
``[ qemu-nbd ... ]``, on a private socket) into the new image, raw or qcow2. The image is
created empty first, so nbdcopy skips every all-zero block (``--destination-is-zero``) and
qemu-nbd turns the zeroes it still gets into holes (``--detect-zeroes=unmap``): the image
takes what the disk holds, and the restore needs no more room than the restored disks.
Measured on a pipe of 512 MiB holding 30 MiB of data: 30 MiB written, raw or qcow2.
(``qemu-img convert`` cannot read a pipe: it needs the size and seeks.)
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvmsnap_plugin.errors import ArchiveError
from kvmsnap_plugin.host import dirs, process

log = logging.getLogger(__name__)

#: how often the two programs are looked at, seconds
POLL = 0.05


def write_image(source: Sequence[str] | Path, dest: Path, fmt: str, size: int, *,
                timeout: float, env: Mapping[str, str] | None = None) -> Path:
    """``dest`` (0600, replaced once complete) as a ``fmt`` image of ``size`` bytes holding
    the raw disk that ``source`` writes to its stdout (an argv), or that file."""
    nbdcopy = process.find_program("nbdcopy", "libnbd-bin")
    qemu_nbd = process.find_program("qemu-nbd", "qemu-utils")
    with dirs.replacing(dest) as image, tempfile.TemporaryFile() as errors:
        # qemu-img truncates and reuses the file it finds: its mode stays 0600.
        process.run(["qemu-img", "create", "-q", "-f", fmt, image, str(size)], timeout=60)
        copy = [nbdcopy, "--destination-is-zero", "--",
                str(source) if isinstance(source, Path) else "-",
                "[", qemu_nbd, "-f", fmt, "--discard=unmap", "--detect-zeroes=unmap",
                str(image), "]"]
        if isinstance(source, Path):
            _wait([process.spawn(copy, stderr=errors)], timeout, errors)
        else:
            _pipe(source, copy, timeout, env, errors)
    return dest


def _pipe(source: Sequence[str], copy: list[str], timeout: float,
          env: Mapping[str, str] | None, errors) -> None:
    reader = process.spawn(source, stdout=subprocess.PIPE, stderr=errors, env=env)
    try:
        writer = process.spawn(copy, stdin=reader.stdout, stderr=errors)
    except BaseException:
        process.end(reader, grace=2)
        raise
    finally:
        assert reader.stdout is not None
        reader.stdout.close()  # nbdcopy holds it: if it dies, the reader gets EPIPE
    _wait([reader, writer], timeout, errors)


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float, errors) -> None:
    """Both programs exit 0, or both are ended and the restore fails with what they said."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(POLL)
    finally:
        for proc in procs:
            if proc.poll() is None:
                process.end(proc, grace=2)
    failed = next((p for p in procs if p.returncode != 0), None)
    if failed is not None:
        errors.seek(0)
        said = " ".join(errors.read().decode(errors="replace").split())[-300:]
        what = "timed out" if time.monotonic() > deadline else f"exit {failed.returncode}"
        raise ArchiveError(f"streaming the disk image failed ({process.describe(failed.args)}:"
                           f" {what}): {said}", "check the repository (borg check / restic "
                           "check) and the room left in the restore directory")
