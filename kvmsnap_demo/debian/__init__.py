"""A real Debian bookworm test guest: built with debootstrap, cached, and launched.

The busybox demo guest proves the mechanics; this guest proves them on what users run:
systemd, udev, systemd-logind handling the ACPI power button, an ext4 root and an xfs data
volume on a GPT disk. Its workload (``debian-workload.sh``) appends numbered lines to both
filesystems without fsync; with ``commit=600`` and periodic writeback switched off those
lines stay in the page cache, so a crash-consistent copy visibly lacks them and needs
journal/log recovery, while a clean shutdown through the power button writes them out and
leaves a ``clean-shutdown`` marker.

``recipe`` says what goes into the image, ``build`` makes and caches it, ``vm`` launches
it and ``disk`` reads a copy of its disk without booting it. ``realistic`` adds a second
disk laid out like real installs (BIOS boot, EFI vfat, swap, LVM, btrfs, LUKS2).
"""

from kvmsnap_demo.debian.build import build_debian_guest
from kvmsnap_demo.debian.disk import GuestFilesystem, read_guest_disk
from kvmsnap_demo.debian.realistic import RealisticGuest, build_realistic_guest, realistic_vm
from kvmsnap_demo.debian.recipe import LAYOUT, DebianGuest, Partition, apt_mirror, fstab
from kvmsnap_demo.debian.vm import BUTTON_WATCHED, DebianVM, debian_argv, debian_vm

__all__ = [
    "BUTTON_WATCHED", "LAYOUT", "DebianGuest", "DebianVM", "GuestFilesystem", "Partition",
    "RealisticGuest", "apt_mirror", "build_debian_guest", "build_realistic_guest", "debian_argv",
    "debian_vm", "fstab", "read_guest_disk", "realistic_vm",
]
