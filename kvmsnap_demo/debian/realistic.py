"""The Debian test guest laid out like real installs, on a second disk (issue #14).

Distribution installers lay disks out with a BIOS boot partition, an EFI system partition
(vfat), swap, LVM, btrfs subvolumes and LUKS; the plain test guest has ext4 and xfs only.
The realistic guest is the same image plus a second disk, ``vdb``, laid out by
``debian-layout.sh`` (BIOS boot, ESP at /boot/efi, swap in use, an ext4 LV at /srv, a
btrfs subvolume at /var/lib/btrfs-data, ext4 in LUKS2 at /secret, opened by crypttab with
a key file), with fstab and crypttab on its root naming them, and a write load of its own
on the new filesystems (appends, fsync'ed on btrfs), so that a power cut's image shows each
of them dirty (:func:`layout_verdicts` judges a copy of the disk).

Why a second disk, not the first: the root stays where the kernel command line and the
plain guest's tests expect it (``vda1``), the realistic guest shares the plain guest's
image instead of a second debootstrap, and the layout can be built by the guest itself
from a blank disk (this host has no device-mapper: it cannot make LVM or LUKS volumes).

The guest builds it on one boot at cache-build time (:func:`build_realistic_guest`) and
powers off; the root's changes (a small qcow2 on the plain image) and the laid-out disk are
cached beside the plain image, so tests only put overlays on them (:func:`realistic_vm`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmsnap_demo.cache import build_once
from kvmsnap_demo.debian.recipe import LAYOUT_ARG, LAYOUT_FW_CFG, DebianGuest
from kvmsnap_demo.debian.vm import DebianVM, debian_vm, make_overlay
from kvmsnap_plugin.disks import classify, expose, verify
from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import Verdict
from kvmsnap_plugin.vm.qemu_args import escape

log = logging.getLogger(__name__)

#: Bump when the way the layout is built changes in a way the hashed inputs do not show.
LAYOUT_VERSION = 1
LAYOUT_ASSET = "debian-layout.sh"
LAYOUT_DISK_MIB = 1024
#: a clean build takes a boot, a few mkfs and a power-off; minutes on a loaded TCG host
BUILD_TIMEOUT = 900.0
BUILT = r"KVMSNAP-LAYOUT-BUILT luks=(\S+) key=([0-9a-f]+)"

#: every filesystem that holds data, by mount point; the workload writes MARKER_FILE into
#: the top of each (the btrfs one is the subvolume @data)
DATA_MOUNTPOINTS = ("/", "/data", "/boot/efi", "/srv", "/var/lib/btrfs-data", "/secret")
MARKER_FILE = "kvmsnap-marker"
MARKER_LINE = r"KVMSNAP-MARKER (\S+) (\S+) (\S+) ?(\S*)"
#: the layout's own write load (debian-layout.sh) has fsync'ed the btrfs log at least once
LAYOUT_WORKLOAD = r"KVMSNAP-LAYOUT-WORKLOAD"
#: the layout disk's filesystems by mount point, as kvmsnap names them (the disk is vdisk1)
LAYOUT_FILESYSTEMS = {"/boot/efi": "vdisk1/p2", "/srv": "vdisk1/lvm/kvmsnap-vg/srv",
                      "/var/lib/btrfs-data": "vdisk1/p5", "/secret": "vdisk1/p6"}


@dataclass(frozen=True)
class RealisticGuest:
    """A built, cached realistic guest. Nothing here may be written: overlay the images."""

    guest: DebianGuest  # the plain guest it is built on
    root_image: Path  # qcow2 over the plain image: fstab, crypttab and the LUKS key file
    layout_image: Path  # qcow2: the laid-out second disk
    luks_uuid: str  # of the LUKS2 partition (vdb6)
    key_file: Path  # the host's copy of the guest's LUKS key (test data)
    build_seconds: float  # the layout boot, from QEMU's start to its exit


def build_realistic_guest(guest: DebianGuest, accel: str) -> RealisticGuest:
    """Return the cached realistic guest, building it first if missing (a boot, minutes).

    Safe to call from parallel test sessions: they wait for one another's build.
    """
    directory = guest.base_image.parent
    final = directory / f"realistic-{layout_key(guest)}"
    build_once(final, "info.json", lambda staging: _build_into(staging, guest, accel),
               lock=directory / ".debian-build.lock")
    info = json.loads((final / "info.json").read_text())
    return RealisticGuest(guest, final / "root.qcow2", final / "layout.qcow2",
                          info["luks_uuid"], final / "luks.key", info["build_seconds"])


def layout_key(guest: DebianGuest) -> str:
    """Hash of the layout's inputs; the plain image's own key is its directory's name."""
    recipe = {"version": LAYOUT_VERSION, "script": layout_script().decode(),
              "disk_mib": LAYOUT_DISK_MIB, "guest": guest.key}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def layout_script() -> bytes:
    return resources.files("kvmsnap_demo").joinpath(LAYOUT_ASSET).read_bytes()


def _build_into(staging: Path, guest: DebianGuest, accel: str) -> None:
    """Boot the guest once on a blank second disk (the console log stays in the build as
    ``console.log``)."""
    log.info("laying out the realistic Debian guest's second disk (a boot, minutes)")
    root = make_overlay(guest.base_image, staging / "root.qcow2")
    layout = staging / "layout.qcow2"
    process.run(["qemu-img", "create", "-q", "-f", "qcow2", layout,
                 f"{LAYOUT_DISK_MIB}M"], timeout=60)
    script = staging / "layout.sh"
    script.write_bytes(layout_script())
    started = time.monotonic()
    luks_uuid, key = _layout_boot(guest, accel, staging, root, layout, script)
    info = {"luks_uuid": luks_uuid, "build_seconds": round(time.monotonic() - started, 1)}
    (staging / "luks.key").write_text(key)
    (staging / "luks.key").chmod(0o400)
    for image in (root, layout):
        image.chmod(0o444)
    (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n")  # last: done
    log.info("laid out the realistic guest in %.0f s", info["build_seconds"])


def _layout_boot(guest: DebianGuest, accel: str, workdir: Path, root: Path, layout: Path,
                 script: Path) -> tuple[str, str]:
    """The boot that lays out ``layout``: the LUKS UUID and key the guest reports."""
    booting = dataclasses.replace(guest, append=f"{guest.append} {LAYOUT_ARG}")
    fw_cfg = ("-fw_cfg", f"name={LAYOUT_FW_CFG},file={escape(script)}")
    with debian_vm(booting, accel, workdir, disk=root, extra_disks=(layout,), nic=False,
                   extra_args=fw_cfg) as vm:
        exited = vm.wait_exit(BUILD_TIMEOUT)
        console = vm.plain_console()
        if exited:
            vm.ended_by = "guest"
    found = re.search(BUILT, console)
    if not found:
        shutil.copy(workdir / "console.log", workdir.parent / ".realistic-failed.log")
        why = "did not power off" if not exited else "reported no layout"
        raise HostError(f"the layout boot of the realistic Debian guest {why}",
                        f"see its console: {workdir.parent / '.realistic-failed.log'}")
    return found.group(1), found.group(2)


@contextlib.contextmanager
def realistic_vm(guest: RealisticGuest, accel: str, workdir: Path,
                 memory_mib: int = 1024) -> Iterator[DebianVM]:
    """Start the realistic guest on fresh overlays of both disks in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    root = make_overlay(guest.root_image, workdir / "disk0.qcow2")
    layout = make_overlay(guest.layout_image, workdir / "disk1.qcow2")
    with debian_vm(guest.guest, accel, workdir, memory_mib, disk=root,
                   extra_disks=(layout,)) as vm:
        yield vm


def markers(console: str) -> dict[str, tuple[str, str, str]]:
    """What the workload reported writing: mount point -> (device, fstype, device type)."""
    return {m.group(1): m.group(2, 3, 4) for m in re.finditer(MARKER_LINE, console)}


def marker_text(mountpoint: str, boot_id: str) -> str:
    """The content of the workload's marker on ``mountpoint`` (its line, with newline)."""
    return f"kvmsnap marker of {mountpoint}, boot {boot_id}\n"


def layout_verdicts(guest: RealisticGuest, image: Path, image_format: str,
                    workdir: Path) -> dict[str, Verdict]:
    """kvmsnap's verdict of each filesystem of a copy of the layout disk, by where kvmsnap
    names it: exposed as a files backup exposes it (the LV, the LUKS volume and vfat
    through libguestfs where the host has no device-mapper or vfat), judged by its code."""
    images = [("vdisk1", image, image_format)]
    keys = ((guest.luks_uuid, guest.key_file),)
    with expose.exposed(images, workdir, workdir / "mnt", luks_keys=keys) as exposure:
        found = verify.verdicts(classify.to_verdict(exposure.filesystems, image_only=False))
    return {verdict.where: verdict for verdict in found}
