"""Exposing disk images without nbd: partition tables, ext4 and xfs, raw views, teardown."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kvmsnap_plugin.disks import verify
from kvmsnap_plugin.disks.expose import exposed
from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import mounts, process
from kvmsnap_plugin.model import FsState


def partitioned_image(tmp_path: Path) -> Path:
    """A qcow2 with a GPT: p1 ext4 holding a file, p2 xfs."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(512 << 20)
    process.run(["sfdisk", "-q", raw], timeout=30, input=b"label: gpt\n,100M\n,\n")
    loop = process.run(["losetup", "-P", "-f", "--show", raw], timeout=30).stdout.strip()
    try:
        process.run(["partx", "--add", loop], timeout=30, check=False)
        process.run(["mkfs.ext4", "-q", f"{loop}p1"], timeout=60)
        process.run(["mkfs.xfs", "-q", f"{loop}p2"], timeout=60)
        process.run(["debugfs", "-w", "-R", "mkdir /etc", f"{loop}p1"], timeout=30)
    finally:
        process.run(["losetup", "-d", loop], timeout=30)
    image = tmp_path / "disk.qcow2"
    process.run(["qemu-img", "convert", "-O", "qcow2", raw, image], timeout=120)
    raw.unlink()
    return image


def test_partitions_are_mounted_read_only_and_torn_down(tmp_path):
    image = partitioned_image(tmp_path)
    root = tmp_path / "mnt"
    with exposed([("vdisk0", image, "qcow2")], tmp_path / "work", root) as exposure:
        [disk] = exposure.disks
        assert [(f.partition, f.fstype) for f in disk.filesystems] == [("p1", "ext4"),
                                                                       ("p2", "xfs")]
        assert (root / "vdisk0" / "p1" / "etc").is_dir()
        assert (root / "vdisk0" / "p2").is_dir()
        with pytest.raises(OSError):
            (root / "vdisk0" / "p1" / "new").write_text("read-only, please")
        assert disk.image.stat().st_size == 512 << 20  # the raw view of the whole disk
        for mountpoint in (root / "vdisk0" / "p1", root / "vdisk0" / "p2"):
            assert {"ro", "nosuid", "nodev", "noexec"} <= mount_options(mountpoint)
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o700
                   for p in (root, root / "vdisk0", tmp_path / "work" / "images"))
        verdicts = verify.verdicts(exposure.filesystems)
        assert [(v.partition, v.state) for v in verdicts] == [
            ("p1", FsState.CLEAN), ("p2", FsState.CLEAN)]
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert str(tmp_path) not in process.run(["losetup", "-a"], timeout=30).stdout
    assert list((tmp_path / "work" / "images").iterdir()) == []


def test_a_mount_root_that_is_not_empty_is_refused(tmp_path):
    root = tmp_path / "mnt"
    root.mkdir(mode=0o700)
    (root / "leftover").mkdir()
    with pytest.raises(HostError, match="not empty"), \
            exposed([("vdisk0", tmp_path / "x.qcow2", "qcow2")], tmp_path / "work", root):
        pass


def test_a_mount_root_others_can_enter_is_refused(tmp_path):
    root = tmp_path / "mnt"
    root.mkdir()
    root.chmod(0o755)  # guest files with the guest's owners would be readable by host users
    with pytest.raises(HostError, match=f"the mount root {root} is not mode 0700"), \
            exposed([("vdisk0", tmp_path / "x.qcow2", "qcow2")], tmp_path / "work", root):
        pass


def mount_options(mountpoint: Path) -> set[str]:
    """The per-mount options of ``mountpoint`` in /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            return set(fields[5].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def raw_disk_with_a_qcow2_header(tmp_path: Path, canary: bytes) -> Path:
    """What a guest can write into its raw disk: a qcow2 header naming a host file (holding
    ``canary``) as its backing file."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(canary * (1 << 20 // len(canary)))
    disk = tmp_path / "guest-disk.img"
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
                 disk, "1M"], timeout=30)
    with open(disk, "r+b") as handle:
        handle.truncate(1 << 20)
    return disk


def test_a_raw_disk_holding_a_qcow2_header_is_exposed_as_the_raw_bytes_it_is(tmp_path):
    canary = b"KVMSNAP-CANARY-7f3a9c"
    disk = raw_disk_with_a_qcow2_header(tmp_path, canary)
    assert disk.read_bytes()[:4] == b"QFI\xfb"
    with exposed([("vdisk0", disk, "raw")], tmp_path / "work", tmp_path / "mnt") as exposure:
        view = exposure.disks[0].image.read_bytes()
    assert view == disk.read_bytes()
    assert canary not in view


@pytest.mark.parametrize("direct_io", [True, False])
def test_loop_devices_read_the_disk_with_direct_io_when_asked(tmp_path, direct_io):
    """Image archives read whole disks from the loop devices: with direct I/O they skip the
    FUSE file's page cache (~5x faster here); files mode keeps it (issue #15). Either way
    the device holds the disk's bytes, its partitions mount, and reads ahead 4 MiB."""
    image = partitioned_image(tmp_path)
    with exposed([("vdisk0", image, "qcow2")], tmp_path / "work", tmp_path / "mnt",
                 direct_io=direct_io) as exposure:
        [disk] = exposure.disks
        assert mounts.loop_direct_io(disk.loop) is direct_io
        assert process.run(["blockdev", "--getra", disk.loop], timeout=30).stdout.strip() \
            == "8192"  # 4 MiB
        assert (tmp_path / "mnt" / "vdisk0" / "p1" / "etc").is_dir()
        with open(disk.loop, "rb") as device, open(disk.image, "rb") as view:
            while chunk := device.read(4 << 20):
                assert chunk == view.read(len(chunk))
            assert view.read(1) == b""
