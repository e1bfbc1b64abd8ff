"""Safe directories and files: kvmsnap writes as root only where nobody else can swap or
read what it puts there (host/dirs.py). Runs as root, like kvmsnap (chown needs it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import dirs

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def directory(path: Path, mode_bits: int, uid: int = 0) -> Path:
    path.mkdir()
    os.chmod(path, mode_bits)
    os.chown(path, uid, -1)
    return path


def test_missing_directories_are_made_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        made = dirs.private_dir(tmp_path / "a" / "b", "the work directory")
    finally:
        os.umask(old)
    assert made == tmp_path / "a" / "b"
    assert mode(tmp_path / "a") == mode(made) == 0o700


@pytest.mark.parametrize("bits, uid, problem", [
    (0o755, 0, "is not mode 0700"),
    (0o777, 0, "writable by group or others"),
    (0o700, NOBODY, "not owned by root"),
])
def test_kvmsnaps_own_directory_must_be_root_owned_0700(tmp_path, bits, uid, problem):
    work = directory(tmp_path / "kvmsnap", bits, uid)
    with pytest.raises(HostError, match=problem) as info:
        dirs.private_dir(work, "the work directory")
    message = info.value.one_line()
    assert "\n" not in message and str(work) in message and f"{bits:04o}" in message
    assert f"chown root: {work} && chmod 700 {work}" in info.value.hint


def test_a_directory_the_user_names_may_be_readable_but_not_writable_by_others(tmp_path):
    assert dirs.user_dir(directory(tmp_path / "ok", 0o755), "the work directory")
    for name, bits, uid in (("open", 0o777, 0), ("sticky", 0o1777, 0), ("theirs", 0o755,
                                                                        NOBODY)):
        with pytest.raises(HostError, match="the work directory"):
            dirs.user_dir(directory(tmp_path / name, bits, uid), "the work directory")


def test_a_symlink_is_refused_even_to_a_good_directory(tmp_path):
    good = directory(tmp_path / "good", 0o700)
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(HostError, match="symbolic link"):
        dirs.private_dir(tmp_path / "link", "the state directory")


def test_the_directories_above_are_checked_sticky_ones_pass(tmp_path):
    shared = directory(tmp_path / "shared", 0o777)
    with pytest.raises(HostError, match=f"a directory above the work directory {shared} is "
                                        "writable by group or others"):
        dirs.user_dir(shared / "work", "the work directory")
    assert not (shared / "work").exists()  # refused before anything was made
    theirs = directory(tmp_path / "theirs", 0o755, NOBODY)
    with pytest.raises(HostError, match="not owned by root"):
        dirs.private_dir(theirs / "kvmsnap", "the work directory")
    like_tmp = directory(tmp_path / "tmp", 0o1777)
    assert mode(dirs.private_dir(like_tmp / "kvmsnap", "the work directory")) == 0o700


def test_a_symlink_above_counts_for_where_it_leads(tmp_path):
    shared = directory(tmp_path / "shared", 0o777)
    (tmp_path / "alias").symlink_to(shared)
    with pytest.raises(HostError, match="writable by group or others"):
        dirs.user_dir(tmp_path / "alias" / "work", "the work directory")
    (tmp_path / "fine").symlink_to(directory(tmp_path / "real", 0o755))
    assert dirs.user_dir(tmp_path / "fine" / "work", "the work directory").is_dir()


def test_files_are_created_new_0600_never_through_a_symlink(tmp_path):
    old = os.umask(0)
    try:
        dirs.create_file(tmp_path / "new", b"data")
    finally:
        os.umask(old)
    assert mode(tmp_path / "new") == 0o600 and (tmp_path / "new").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        dirs.create_file(tmp_path / "new", b"again")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "trap").symlink_to(victim)
    with pytest.raises(OSError):
        dirs.create_file(tmp_path / "trap", b"overwritten")
    assert victim.read_bytes() == b"keep"


def test_a_replaced_file_is_0600_and_a_symlink_there_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "note").symlink_to(victim)
    dirs.replace_file(tmp_path / "note", b"text")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "note").is_symlink() and mode(tmp_path / "note") == 0o600
    assert (tmp_path / "note").read_bytes() == b"text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note", "victim"]


def test_a_check_alone_makes_nothing_but_refuses_the_same(tmp_path):
    assert dirs.private_dir(tmp_path / "a" / "b", "x", create=False) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    shared = directory(tmp_path / "shared", 0o777)
    with pytest.raises(HostError, match="writable by group or others"):
        dirs.user_dir(shared / "work", "the work directory", create=False)


def test_recovery_removes_an_empty_socket_directory_a_killed_run_left_and_nothing_else(
        tmp_path, monkeypatch):
    """A run killed while exposed leaves its export's ``s-*`` directory; once recovery has
    deleted the socket in it, the empty directory goes too. A directory that still holds
    something, or is not one of socket_dir()'s, stays."""
    import tempfile

    from kvmsnap_plugin import paths

    monkeypatch.setattr(paths, "RUNTIME_DIR", tmp_path / "run")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with paths.socket_dir() as sockets:
        pass  # made and removed: the normal exit
    assert not sockets.exists()
    left = tmp_path / "run" / "s-left"
    left.mkdir()
    assert paths.remove_if_empty_socket_dir(left) and not left.exists()
    busy = tmp_path / "run" / "s-busy"
    busy.mkdir()
    (busy / "nbd.sock").touch()
    assert not paths.remove_if_empty_socket_dir(busy) and busy.exists()
    other = tmp_path / "run" / "work"
    other.mkdir()
    assert not paths.remove_if_empty_socket_dir(other) and other.exists()
    elsewhere = tmp_path / "s-elsewhere"
    elsewhere.mkdir()
    assert not paths.remove_if_empty_socket_dir(elsewhere) and elsewhere.exists()
