"""The Debian test guest's recipe: what goes into the image, and how it is keyed and found.

Everything here is hashed into the cache key (:func:`cache_key`), so a changed recipe gets
a fresh image under ``~/.cache/kvmsnap/debian-KEY/``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.host import mounts

#: Bump when the build procedure changes in a way the hashed inputs do not show.
RECIPE_VERSION = 2
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "initramfs-tools", "dbus",
            "xfsprogs", "e2fsprogs",
            # the realistic layout (:mod:`kvmsnap_demo.debian.realistic`): built by the guest
            "lvm2", "cryptsetup", "dosfstools", "btrfs-progs", "gdisk",
            # `kvmsnap verify` asks the guest agent whether the guest came up; the clone's
            # shutdown asks it for the network filesystems it must detach
            # (tests/integration/test_network_fs.py mounts NFS with nfs-common)
            "qemu-guest-agent", "nfs-common")
#: Installed after the configuration is written, so its initramfs is built only once.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
DISK_MIB = 2048
HOSTNAME = "kvmsnap-debian"
WORKLOAD_ASSET = "debian-workload.sh"
WORKLOAD_LOG = "workload.log"
MARKER = "clean-shutdown"
ROOT_WORKLOAD_DIR = "/var/lib/kvmsnap-workload"
#: the kernel command-line word that makes a boot run the host's layout script, and the
#: fw_cfg name the script comes in
LAYOUT_ARG = "kvmsnap.layout"
LAYOUT_FW_CFG = "opt/kvmsnap/layout"

#: fsck.mode=skip and rw: no fsck pass and no remount under slow TCG; panic=-1 with
#: QEMU's -no-reboot turns a kernel panic into a quick QEMU exit instead of a hang.
#: systemd.status_unit_format=name keeps status lines short and greppable
#: ("Stopped kvmsnap-workload.service.") instead of ellipsized descriptions.
APPEND = ("root=/dev/vda1 rootfstype=ext4 rw rootflags=commit=600 console=ttyS0 "
          "systemd.show_status=1 systemd.status_unit_format=name fsck.mode=skip panic=-1")

#: Units that only cost boot time under TCG, write to the disk behind the workload's back,
#: or would wait for things this guest does not have. No getty: nobody logs in.
MASKED_UNITS = (
    "serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
    "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "xfs_scrub_all.timer",
    "systemd-tmpfiles-clean.timer", "systemd-networkd-wait-online.service",
    "systemd-hwdb-update.service", "ldconfig.service", "systemd-update-done.service",
)


@dataclass(frozen=True)
class Partition:
    """One partition of the guest disk, as the guest sees it."""

    number: int
    name: str  # the GPT partition name
    fstype: str
    mountpoint: str
    size_mib: int  # 0: the rest of the disk
    label: str
    uuid: str = ""  # the filesystem UUID, known once built


LAYOUT = (
    Partition(1, "root", "ext4", "/", 1536, "kvmsnap-root"),
    Partition(2, "data", "xfs", "/data", 0, "kvmsnap-data"),
)

#: Static files written into the guest (path relative to its root -> content).
GUEST_FILES: dict[str, str] = {
    "etc/hostname": f"{HOSTNAME}\n",
    "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    # The cloud kernel has its virtio drivers as modules: the initramfs must carry them.
    "etc/initramfs-tools/modules": "# kvmsnap: the root disk is virtio-blk\n"
                                   "virtio_pci\nvirtio_blk\next4\n",
    "etc/initramfs-tools/conf.d/kvmsnap": "RESUME=none\nCOMPRESS=gzip\n",
    # Buffered writes stay in the page cache until a sync or an unmount. xfs forces its
    # log every second instead of every 30: its metadata changes reach the on-disk log at
    # once, so a crash-consistent copy shows a dirty log, not an idle one that looks clean.
    "etc/sysctl.d/90-kvmsnap.conf": "vm.dirty_writeback_centisecs = 0\n"
                                    "vm.dirty_expire_centisecs = 360000\n"
                                    "fs.xfs.xfssyncd_centisecs = 100\n",
    # button: the ACPI "Power Button" input device; evdev: its /dev/input/event node,
    # through which systemd-logind sees it; xfs: loaded before systemd-sysctl runs, so
    # its fs.xfs.* setting exists by then.
    "etc/modules-load.d/kvmsnap.conf": "button\nevdev\nxfs\n",
    # Nothing to gain from these under TCG, only boot time.
    "etc/modprobe.d/kvmsnap-blacklist.conf": "blacklist kvm_amd\nblacklist kvm_intel\n"
                                             "blacklist powernow_k8\n",
    # logind's own messages ("Watching system buttons", "Power key pressed") on the
    # console, so the host sees who handled the button.
    "etc/systemd/system/systemd-logind.service.d/kvmsnap-console.conf":
        "[Service]\nEnvironment=SYSTEMD_LOG_TARGET=console\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n",
    "etc/systemd/journald.conf.d/kvmsnap.conf": "[Journal]\nStorage=volatile\n",
    "etc/systemd/system.conf.d/kvmsnap.conf": "[Manager]\nDefaultTimeoutStopSec=20s\n",
    "etc/systemd/system/kvmsnap-workload.service": """\
[Unit]
Description=kvmsnap test workload
RequiresMountsFor=/var/lib /data
# Not while the guest lays out its realistic second disk (that boot only builds it).
ConditionKernelCommandLine=!kvmsnap.layout
# READY must mean the power button works: logind watches the buttons before it is started.
After=systemd-logind.service

[Service]
Type=exec
ExecStart=/usr/local/sbin/kvmsnap-workload
TimeoutStopSec=20s

[Install]
WantedBy=multi-user.target
""",
    # Runs the script the host passes in fw_cfg, on a boot whose command line asks for it:
    # the realistic layout is built by the guest (the host may lack device-mapper), and
    # the script stays out of this image, so changing it does not rebuild the image.
    "etc/systemd/system/kvmsnap-layout.service": f"""\
[Unit]
Description=kvmsnap: lay out a blank disk with the script the host passes
ConditionKernelCommandLine={LAYOUT_ARG}
After=local-fs.target systemd-udev-settle.service
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStartPre=/sbin/modprobe qemu_fw_cfg
ExecStart=/bin/sh /sys/firmware/qemu_fw_cfg/by_name/{LAYOUT_FW_CFG}/raw
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
""",
}


@dataclass(frozen=True)
class DebianGuest:
    """A built, cached Debian guest. Nothing here may be written: overlay the image."""

    base_image: Path  # qcow2, read-only
    kernel: Path
    initrd: Path
    append: str  # the kernel command line
    partitions: tuple[Partition, ...]
    kernel_version: str
    key: str  # the cache key: hash of the recipe

    def partition(self, name: str) -> Partition:
        return next(p for p in self.partitions if p.name == name)


def load_guest(directory: Path) -> DebianGuest:
    info = json.loads((directory / "build-info.json").read_text())
    return DebianGuest(
        base_image=directory / "base.qcow2", kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img", append=APPEND,
        partitions=tuple(Partition(**p) for p in info["partitions"]),
        kernel_version=info["kernel_version"], key=info["key"])


def cache_key(mirror: str) -> str:
    """Hash of every input of the build, so a changed recipe gets a fresh image."""
    recipe = {
        "version": RECIPE_VERSION, "suite": SUITE, "mirror": mirror,
        "packages": PACKAGES, "kernel": KERNEL_PACKAGE, "disk_mib": DISK_MIB,
        "layout": [asdict(p) for p in LAYOUT], "files": GUEST_FILES,
        "masked": MASKED_UNITS, "workload": workload_script().decode(),
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The host's Debian mirror URI for bookworm main (deb822 first, then one-line lists)."""
    for sources in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = _deb822_fields(stanza)
            if ("deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()):
                return fields["uris"].split()[0]
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in (p for p in lists if p.exists()):
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#")[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words:
                return words[1]
    raise HostError(f"no apt source for Debian {SUITE} main",
                    "add one to /etc/apt/sources.list.d/debian.sources "
                    "(URIs: http://deb.debian.org/debian)")


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def workload_script() -> bytes:
    return resources.files("kvmsnap_demo").joinpath(WORKLOAD_ASSET).read_bytes()


def fstab(partitions: Sequence[Partition]) -> str:
    """By UUID; fsck pass 0 (the guest boots with fsck.mode=skip anyway)."""
    lines = ["# kvmsnap Debian test guest"]
    for part in partitions:
        options = "defaults,commit=600" if part.fstype == "ext4" else "defaults"
        lines.append(f"UUID={part.uuid} {part.mountpoint} {part.fstype} {options} 0 0")
    return "\n".join(lines) + "\n"


def partition_devices(loop: Path, timeout: float = 10.0) -> dict[int, Path]:
    """The block device of each :data:`LAYOUT` partition on a loop device, by number."""
    found = dict(mounts.block_devices(loop, timeout))
    missing = [part.number for part in LAYOUT if f"p{part.number}" not in found]
    if missing:
        raise HostError(f"{loop}: no partition(s) {missing} on this disk",
                        "is this a Debian test guest's GPT disk image?")
    return {part.number: found[f"p{part.number}"] for part in LAYOUT}
