"""host.mounts without root: reading the mount table. Attaching and mounting need root and
real block devices; the integration tests (test_expose, the Debian guest) cover them."""

from __future__ import annotations

from pathlib import Path

from kvmsnap_plugin.host import mounts

TABLE = """\
/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/loop3p1 /var/tmp/kvmsnap/root/vm\\040one/p1 ext4 ro,noload 0 0
/dev/loop4 /mnt/tab\\011and\\134backslash xfs ro,norecovery 0 0
"""


def test_mount_points_decode_the_kernels_octal_escapes():
    assert mounts.mount_points(TABLE) == [
        "/", "/proc", "/var/tmp/kvmsnap/root/vm one/p1", "/mnt/tab\tand\\backslash"]


def test_is_mountpoint_reads_this_process_mount_table(tmp_path: Path):
    assert mounts.is_mountpoint(Path("/proc"))
    assert not mounts.is_mountpoint(tmp_path)


def test_mounts_under_lists_deepest_first_and_not_name_prefixes(tmp_path: Path):
    assert mounts.mounts_under(tmp_path) == []
    under_proc = mounts.mounts_under(Path("/proc"))
    assert under_proc[-1] == "/proc"
    assert all(m == "/proc" or m.startswith("/proc/") for m in under_proc)
    assert [len(m) for m in under_proc] == sorted((len(m) for m in under_proc), reverse=True)
