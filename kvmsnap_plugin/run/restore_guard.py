"""What a restore must never overwrite: a directory with something in it (unless
``--force``), and never an image a running process holds open (a running VM's disk:
with or without ``--force``; shut the VM off first)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.host import dirs


def checked_target(to: Path, force: bool, keep: Iterable[str] = ()) -> Path:
    """The restore directory (created 0700, or checked); refused if it holds anything but
    ``keep`` (kvmsnap's own notes) and hidden files, unless ``force``."""
    dirs.user_dir(to, "the restore directory")
    found = sorted(p.name for p in to.iterdir()
                   if p.name not in set(keep) and not p.name.startswith("."))
    if found and not force:
        raise UsageError(f"{to} is not empty ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''})",
                         "restore into an empty directory, or pass --force to overwrite "
                         "the images there (refused anyway while a running VM uses them)")
    return to.resolve()


def refuse_images_in_use(paths: Iterable[Path]) -> None:
    """Refuse to write over a file a running process (a VM's QEMU) has open."""
    wanted = {str(p.resolve()) for p in paths if p.exists()}
    if not wanted:
        return
    for pid, path in _open_files():
        if path in wanted:
            raise UsageError(f"{path} is in use by running process {pid} ({_name(pid)}): "
                             "restoring over a running VM's disk is refused",
                             "shut the VM off first (then --force overwrites its images), "
                             "or restore into another directory")


def _open_files() -> Iterable[tuple[int, str]]:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                yield int(proc.name), os.readlink(fd)
            except OSError:
                continue


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
