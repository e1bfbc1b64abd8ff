"""host.mounts without root: reading the mount table. Attaching and mounting need root and
real block devices; the integration tests (test_expose, the Debian guest) cover them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsnap_plugin.host import mounts, process

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


def test_every_guest_filesystem_is_mounted_read_only_nosuid_nodev_noexec():
    for fstype, options in mounts.MOUNT_OPTIONS.items():
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(",")), fstype


MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
25 22 0:21 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
40 22 0:35 / /srv/backup rw,relatime shared:20 - nfs4 nas:/backup rw,vers=4.2
41 40 0:36 / /srv/backup/local rw shared:21 - ext4 /dev/vdb rw
42 22 0:37 / /mnt/my\\040box rw,nosuid shared:22 - fuse.sshfs me@box:/ rw
43 25 0:38 / /run rw shared:23 - ext4 /dev/vdc rw
"""


@pytest.mark.parametrize("path, fstype", [
    ("/var/tmp/kvmsnap", "ext4"), ("/srv/backup", "nfs4"), ("/srv/backup/x/y", "nfs4"),
    ("/srv/backup/local/work", "ext4"), ("/srv/backupx", "ext4"),
    ("/mnt/my box/work", "fuse.sshfs"), ("/run/kvmsnap", "ext4"),  # mounted over: the top
])
def test_the_filesystem_of_a_path_is_the_deepest_mount_above_it(path, fstype):
    assert mounts.filesystem_type(Path(path), MOUNTINFO) == fstype


def test_network_and_fuse_filesystems_are_remote():
    assert [t for t in ("ext4", "xfs", "tmpfs", "btrfs", "nfs4", "cifs", "fuse.sshfs",
                        "fuseblk", "9p", "ceph") if mounts.is_remote(t)] == \
        ["nfs4", "cifs", "fuse.sshfs", "fuseblk", "9p", "ceph"]


def test_this_hosts_own_mount_table_is_read():
    assert mounts.filesystem_type(Path("/proc/self")) == "proc"


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_each_filesystem_this_host_mounts_accepts_its_read_only_options(tmp_path, fstype):
    """The options reach the real kernel: one it does not know would fail every mount of
    that type, and only a guest with such a filesystem would show it."""
    image = tmp_path / f"{fstype}.img"
    with open(image, "wb") as out:
        out.truncate(320 << 20)  # xfs wants >= 300 MiB, btrfs >= 109 MiB
    process.run([f"mkfs.{fstype}", "-q", *(["-f"] if fstype == "btrfs" else []), str(image)],
                timeout=60)
    target = tmp_path / "mnt"
    target.mkdir()
    with mounts.loop_attached(image) as loop:
        mounts.mount_read_only(loop, target, fstype)
        try:
            assert mounts.is_mountpoint(target)
        finally:
            mounts.unmount(target, remove=False)


def test_two_xfs_filesystems_with_one_uuid_mount_at_once(tmp_path):
    """Clones of one template share their xfs UUID; backed up at once, both must mount."""
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    with open(first, "wb") as out:
        out.truncate(320 << 20)
    process.run(["mkfs.xfs", "-q", str(first)], timeout=60)
    process.run(["cp", "--sparse=always", str(first), str(second)], timeout=60)
    targets = [tmp_path / "ma", tmp_path / "mb"]
    with mounts.loop_attached(first) as loop_a, mounts.loop_attached(second) as loop_b:
        try:
            for loop, target in zip((loop_a, loop_b), targets, strict=True):
                target.mkdir()
                mounts.mount_read_only(loop, target, "xfs")
            assert all(mounts.is_mountpoint(t) for t in targets)
        finally:
            for target in targets:
                if mounts.is_mountpoint(target):
                    mounts.unmount(target, remove=False)


def test_a_loop_device_the_kernel_gives_no_direct_io_is_attached_without(monkeypatch):
    """Direct I/O only makes image reads faster: a refusal must not fail the backup, nor
    attach a second device (older losetup attaches, then fails on ``--direct-io``)."""
    calls = []

    def run(argv, check=True, **_):
        calls.append([str(a) for a in argv])
        if "--direct-io=on" in argv:
            assert not check  # a refusal is not an error
            return process.Result(tuple(argv), 1, "", "losetup: set direct io failed")
        return process.Result(tuple(argv), 0, "/dev/loop7\n", "")

    monkeypatch.setattr(process, "run", run)
    assert mounts.attach_loop(Path("/x/disk.raw"), direct_io=True) == Path("/dev/loop7")
    assert calls == [["losetup", "--read-only", "--partscan", "--find", "--show", "/x/disk.raw"],
                     ["losetup", "--direct-io=on", "/dev/loop7"]]
