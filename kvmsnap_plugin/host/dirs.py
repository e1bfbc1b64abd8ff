"""Directories and files kvmsnap writes as root, where no other user can swap or read them.

kvmsnap puts the guest's RAM, its disks and its mounted filesystems into directories. A
local user who owns one of them, or may rename entries in one above it, could swap a
directory for a symlink, read the guest's data or reach its setuid binaries. So every
directory is created (0700, each missing component) or checked before use:

- kvmsnap's own directories (the default work directory, per-run directories, the images
  directory, mount roots, the state directory): a real directory (no symlink), owned by
  root (or by kvmsnap's user when it does not run as root), mode exactly 0700;
- directories the user names (``--workdir``, ``--keep``, ``restore --to``): a real
  directory, owned as above, writable by nobody else (kvmsnap writes only 0600 files and
  0700 directories into them);
- every directory above either: owned as above and writable by nobody else unless it has
  the sticky bit (``/tmp``, ``/var/tmp``), where others can add entries but not rename or
  remove kvmsnap's.

Files are created new (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600): never through a symlink,
never an existing file of someone else's.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kvmsnap_plugin.errors import HostError

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def private_dir(path: Path, what: str, *, create: bool = True) -> Path:
    """kvmsnap's own directory ``path`` (``what`` names it for people): created 0700, or
    refused unless it is a root-owned 0700 directory. Without ``create``, only checked
    (what exists of it, and above it)."""
    return _ensure(Path(path), what, private=True, create=create)


def user_dir(path: Path, what: str, *, create: bool = True) -> Path:
    """A directory the user named: created 0700, or refused if it is a symlink, not
    root-owned, or writable by group or others."""
    return _ensure(Path(path), what, private=False, create=create)


def create_file(path: Path, content: bytes = b"") -> None:
    """A new 0600 file holding ``content``; refused (OSError) if anything exists there."""
    fd = os.open(path, _NEW_FILE, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)


def replace_file(path: Path, content: bytes) -> None:
    """``path`` holding ``content``, 0600 (see :func:`replacing`)."""
    with replacing(path) as temporary:
        temporary.write_bytes(content)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A new, empty 0600 file of ours beside ``path`` to write; it replaces whatever is at
    ``path`` when the block succeeds (a symlink there is replaced, never followed), and is
    removed when it fails. Nothing readable by others exists at any moment."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # ours (mkstemp); gone already after the replace


def trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _ensure(path: Path, what: str, *, private: bool, create: bool) -> Path:
    path = path.absolute()
    missing = []  # to create, innermost first
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    # Above it, resolved: a symlink such as /var/run counts for where it leads.
    above = Path(os.path.realpath(path if missing else path.parent))
    for directory in (*reversed(above.parents), above):
        _check(directory, f"a directory above {what}", above=True)
    if not missing:
        _check(path, what, private=private)
        return path
    if not create:
        return missing[0]
    for directory in reversed(missing):
        _make(directory, what)
        leaf = directory == missing[0]
        _check(directory, what if leaf else f"a directory above {what}", private=private,
               above=not leaf)
    return missing[0]


def _make(directory: Path, what: str) -> None:
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # whatever the umask
    except FileExistsError:
        pass  # made meanwhile: checked like any existing one
    except OSError as exc:
        raise HostError(f"cannot create {what} {directory}: {exc.strerror}",
                        "run kvmsnap as root, or pick a writable directory") from None


def _check(path: Path, what: str, *, private: bool = False, above: bool = False) -> None:
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise HostError(f"cannot check {what} {path}: {exc.strerror}",
                        "pick another directory") from None
    mode = stat.S_IMODE(info.st_mode)
    problem = _problem(info, mode, private=private, above=above)
    if problem:
        raise HostError(f"{what} {path} {problem} (owner uid {info.st_uid}, mode "
                        f"{mode:04o}): another user could swap or read what kvmsnap puts "
                        "there", _fix(path, info, above))


def _problem(info: os.stat_result, mode: int, *, private: bool, above: bool) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if not trusted_owner(info.st_uid):
        return "is not owned by root"
    if above:
        sticky = bool(mode & stat.S_ISVTX)
        return "" if sticky or not mode & 0o022 else "is writable by group or others"
    if mode & 0o022:
        return "is writable by group or others"
    return "is not mode 0700" if private and mode != 0o700 else ""


def _fix(path: Path, info: os.stat_result, above: bool) -> str:
    owner = "root:" if os.geteuid() == 0 else f"{os.geteuid()}:"
    if not stat.S_ISDIR(info.st_mode):
        return f"remove {path}, or pick another directory"
    if above:
        return f"`chown {owner} {path} && chmod go-w {path}`, or pick another directory"
    return f"`chown {owner} {path} && chmod 700 {path}`, or remove it"
