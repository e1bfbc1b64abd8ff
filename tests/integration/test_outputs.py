"""What kvmsnap hands the user is the user's alone: `--keep` images and `kvmsnap restore`
outputs are 0600 from their first byte, and each image is read in the format it has."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsnap_plugin.host import images, process
from kvmsnap_plugin.model import METADATA_FILE, RecordedDisk, VmRecord
from kvmsnap_plugin.run.restore import restore_borg

pytestmark = pytest.mark.qemu

CANARY = b"KVMSNAP-HOST-CANARY-41d2"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def qcow2_header_on(tmp_path: Path) -> Path:
    """A file a guest could write into its raw disk: a qcow2 header whose backing file is a
    host file holding the canary."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(CANARY * 1000)
    header = tmp_path / "raw-disk.img"
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw",
                 header, "1M"], timeout=30)
    return header


def test_kept_images_are_0600_and_read_in_their_own_format(tmp_path):
    overlay = tmp_path / "overlay.qcow2"
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", overlay, "1M"], timeout=30)
    raw = qcow2_header_on(tmp_path)
    keep = tmp_path / "keep"
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    (keep / "web").mkdir(mode=0o700, parents=True)
    keep.chmod(0o700)
    (keep / "web" / "vdb.qcow2").symlink_to(victim)  # replaced, never written through
    with umask(0o022):
        kept = images.keep_images([("vda", overlay, "qcow2"), ("vdb", raw, "raw")], keep,
                                  "web")
    assert kept == [keep / "web" / "vda.qcow2", keep / "web" / "vdb.qcow2"]
    assert [mode(p) for p in kept] == [0o600, 0o600]
    assert victim.read_bytes() == b"not yours"
    copy = tmp_path / "vdb.raw"
    process.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", kept[1], copy], timeout=30)
    assert copy.read_bytes()[:4] == b"QFI\xfb" and CANARY not in copy.read_bytes()
    assert sorted(p.name for p in (keep / "web").iterdir()) == ["vda.qcow2", "vdb.qcow2"]
    # another VM's images go beside, never over these (a shared [defaults] keep)
    [other] = images.keep_images([("vda", overlay, "qcow2")], keep, "db")
    assert other == keep / "db" / "vda.qcow2" and kept[0].exists()


def test_a_keep_directory_others_may_write_to_is_refused(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    keep.chmod(0o777)
    with pytest.raises(Exception, match=f"the --keep directory {keep} is writable"):
        images.keep_images([], keep, "web")


def test_restored_disks_and_notes_are_0600(tmp_path, borg_repo):
    source = tmp_path / "archive"
    source.mkdir()
    (source / "vda.raw").write_bytes(b"\x01" * (1 << 20))
    record = VmRecord("web", "run-1", "2026-01-01T00:00:00Z", "clean", "background",
                      ["qemu-system-x86_64", "-object", "secret,id=s0,data=hunter2"],
                      [RecordedDisk("vda", "/images/web.qcow2", "qcow2", 1 << 20)])
    (source / METADATA_FILE).write_bytes(record.to_json())
    process.run([process.find_program("borg", "borgbackup"), "create",
                 f"{borg_repo}::web-image", "."], timeout=120, cwd=source)
    with umask(0o022):
        done = restore_borg(f"{borg_repo}::web-image", tmp_path / "restored")
    target = tmp_path / "restored"
    assert mode(target) == 0o700
    files = sorted(target.iterdir())
    assert [p.name for p in files] == ["HOW-TO-BOOT.txt", "boot-argv.json", METADATA_FILE,
                                       "vda.qcow2"]
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert done.disks[0].path == str(target / "vda.qcow2")
