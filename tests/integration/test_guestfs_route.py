"""What the host kernel cannot mount is still archived (issue #14): LVM, LUKS with a key
file, vfat and NTFS, read through ONE libguestfs appliance, on a real guest's disk.

The disk is made by libguestfs itself (tests/integration/guestfs_disk.py), once, and cached
like the test guests; each test gives the demo guest its own overlay of it. Each backup
starts an appliance (20-60 s under TCG): keep these tests few."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import kvmsnap

from kvmsnap_demo.cache import build_once
from kvmsnap_plugin.disks import guestfs_route
from kvmsnap_plugin.host import mounts, process
from kvmsnap_plugin.paths import cache_root
from kvmsnap_plugin.vm.qemu_args import escape

pytestmark = pytest.mark.qemu

#: each marker file, where the backup puts it (the demo names the disk by its device id)
MARKERS = {"srv": "vextra/lvm/k-vg/srv", "data": "vextra/lvm/k-vg/data",
           "tank": "vextra/lvm/k-vg/tank", "luks": "vextra/p2", "vfat": "vextra/p3",
           "ntfs": "vextra/p4"}


@pytest.fixture(scope="module")
def guestfs_disk() -> tuple[Path, Path, str]:
    """(the prepared qcow2, its LUKS key file, the LUKS UUID), made once by libguestfs (a
    minute under TCG, appliance and all) and cached like the test guests, under
    ``~/.cache/kvmsnap/guestfs-disk-KEY/``, KEY a hash of what makes it; the tests only
    ever write overlays of it."""
    cache = cache_root()
    made = build_once(cache / f"guestfs-disk-{recipe_key()}", "uuid",
                      lambda staging: (staging / "uuid").write_text(make_disk(staging)),
                      lock=cache / ".guestfs-disk.lock")
    return made / "layout.qcow2", made / "luks.key", (made / "uuid").read_text()


def recipe_key() -> str:
    recipe = Path(__file__).with_name("guestfs_disk.py").read_bytes() + \
        inspect.getsource(make_disk).encode()
    return hashlib.sha256(recipe).hexdigest()[:12]


def make_disk(where: Path) -> str:
    """Make layout.qcow2 and luks.key in ``where``; returns the LUKS UUID."""
    image, key, xfs = where / "layout.qcow2", where / "luks.key", where / "data.xfs"
    key.write_bytes(b"kvmsnap test key\n\x01 with odd bytes")
    process.run(["truncate", "-s", "320M", xfs], timeout=30)
    process.run(["mkfs.xfs", "-q", xfs], timeout=120)
    with mounts.loop_attached(xfs, writable=True) as loop, \
            mounts.mounted(loop, where / "xfs", "xfs") as mounted:
        (mounted / "marker-data.txt").write_text("marker data\n")
    done = process.run([guestfs_route.GUESTFS_PYTHON, Path(__file__).with_name("guestfs_disk.py"),
                        image, key, xfs], timeout=900, env=guestfs_route.helper_env())
    xfs.unlink()
    return done.stdout.strip().splitlines()[-1]


def start(start_demo, guestfs_disk, tmp_path: Path):
    overlay = tmp_path / "extra.qcow2"
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                 guestfs_disk[0], overlay], timeout=60)
    vm = start_demo(extra_args=(
        "-drive", f"file={escape(overlay)},format=qcow2,if=none,id=extra",
        "-device", "virtio-blk-pci,drive=extra,id=vextra"))
    vm.wait_counter(3)
    return vm


def backup(vm, tmp_path: Path, repo: Path, *extra: str) -> subprocess.CompletedProcess:
    return kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--borg", str(repo),
                   "--workdir", str(tmp_path / "work"), "--json", *extra, timeout=1800)


def extracted(repo: Path, archive: str, paths: list[str], into: Path) -> dict[str, str]:
    """Path -> text of each of ``paths`` in the archive (one borg run: each costs seconds)."""
    into.mkdir()
    process.run([process.find_program("borg", "borgbackup"), "extract", f"{repo}::{archive}",
                 *paths], timeout=300, cwd=into)
    return {path: (into / path).read_text() for path in paths}


def assert_nothing_left(tmp_path: Path, wait: float = 0.0) -> None:
    """No mount under the test's directory, no helper of this checkout running (after a
    split backup's release the helper ends by itself once its FUSE tree is unmounted)."""
    assert not mounts.mounts_under(tmp_path)
    deadline = time.monotonic() + wait
    while True:
        helpers = subprocess.run(["pgrep", "-af", str(guestfs_route.HELPER)],
                                 capture_output=True, text=True).stdout
        if not helpers or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not helpers, helpers


def test_lvm_luks_vfat_ntfs_archived_through_libguestfs(start_demo, guestfs_disk, tmp_path,
                                                         borg_repo):
    _, key, uuid = guestfs_disk
    vm = start(start_demo, guestfs_disk, tmp_path)
    done = backup(vm, tmp_path, borg_repo, "--luks-key", f"{uuid}={key}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    parts = {p["where"]: p for p in report["partitions"]}
    assert parts["vextra/p1"]["outcome"] == "opened"
    for where in MARKERS.values():
        assert parts[where]["outcome"] == "archived", parts[where]
        assert "through libguestfs" in parts[where]["reason"]
    verdicts = {f"{v['disk']}/{v['partition']}": v for v in report["verdicts"]}
    assert {verdicts[where]["state"] for where in MARKERS.values()} == {"clean"}, verdicts
    archive = next(a["name"] for a in report["archives"] if a["kind"] == "files")
    files = {f"{where}/marker-{name}.txt": f"marker {name}\n" for name, where in MARKERS.items()}
    assert extracted(borg_repo, archive, list(files), tmp_path / "extracted") == files
    assert_nothing_left(tmp_path)


def test_without_the_key_the_luks_volume_is_named_not_archived(start_demo, guestfs_disk,
                                                                tmp_path):
    """A split backup (`kvmsnap mount`, then `release`): the volumes stay served through
    libguestfs until the release, which leaves nothing behind."""
    uuid = guestfs_disk[2]
    vm = start(start_demo, guestfs_disk, tmp_path)
    root = tmp_path / "mnt"
    done = kvmsnap("mount", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                   str(tmp_path / "work"), "--mount-root", str(root), "--json", timeout=1800)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(done.stdout)
    parts = {p["where"]: p for p in report["partitions"]}
    assert parts["vextra/p2"]["outcome"] == "not-archived"
    assert report["warnings"] == [
        f"vextra/p2 (crypto_LUKS) NOT ARCHIVED: LUKS volume {uuid}: no key (luks_keys)"]
    assert parts["vextra/lvm/k-vg/srv"]["outcome"] == "archived"
    assert (root / "vextra/lvm/k-vg/srv/marker-srv.txt").read_text() == "marker srv\n"
    assert (root / "vextra/p3/marker-vfat.txt").read_text() == "marker vfat\n"

    released = kvmsnap("release", "--qmp", str(vm.paths.backup_qmp))
    assert released.returncode == 0, released.stderr[-2000:]
    assert not root.exists() or list(root.iterdir()) == []
    assert_nothing_left(tmp_path, wait=120)
