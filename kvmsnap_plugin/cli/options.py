"""The command line's options: the VM, the fork's settings (config keys too), and the ones
every command takes."""

from __future__ import annotations

import argparse

from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
    MAX_PAUSE,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    Mode,
    OnUnclean,
    RamMethod,
)
from kvmsnap_plugin.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR
from kvmsnap_plugin.run.logs import DESTINATIONS

#: what --method offers: a shut-off VM is found, not asked for
METHODS = [m.value for m in RamMethod if m is not RamMethod.OFFLINE]


def add_global_arguments(parser: argparse.ArgumentParser, default: object) -> None:
    """Accepted before the command and after it (``default``: SUPPRESS after it, so an
    option given before is not reset)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="debug log and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress messages")
    parser.add_argument("--json", action="store_true", default=default,
                        help="machine-readable output")
    parser.add_argument("--log", choices=DESTINATIONS,
                        default=None if default is False else default,
                        help="where log lines go (default auto, or KVMSNAP_LOG: the journal "
                        "under systemd, else stderr)")



def add_vm_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--qmp", metavar="SOCKET", help="a bare QEMU's QMP unix socket")
    cmd.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    cmd.add_argument("--libvirt-uri", metavar="URI",
                     help=f"with --domain (default {DEFAULT_LIBVIRT_URI})")


def add_fork_arguments(cmd: argparse.ArgumentParser) -> None:
    add_vm_arguments(cmd)
    cmd.add_argument("--name", help="the VM's name in archives (default: QEMU's -name, else "
                     "its -uuid, else the socket file's stem; a libvirt domain's name)")
    cmd.add_argument("--pid", type=int, help="the QEMU process (default: from the socket)")
    cmd.add_argument("--method", choices=METHODS,
                     help="how to snapshot RAM (default: background if the host supports it)")
    cmd.add_argument("--shutdown-timeout", type=float,
                     metavar="SECONDS", help="power button to a stopped clone, at most "
                     f"(default {SHUTDOWN_TIMEOUT:g})")
    cmd.add_argument("--repress-after", type=float, metavar="SECONDS",
                     help=f"press the power button again after this long "
                     f"(default {REPRESS_AFTER:g})")
    cmd.add_argument("--on-unclean", choices=[o.value for o in OnUnclean],
                     help=f"when the clone does not shut down: {OnUnclean.FAIL} (default), or "
                     f"use the {OnUnclean.CRASH_CONSISTENT} images, labelled as such "
                     "(exit code 1)")
    cmd.add_argument("--workdir", help=f"private work directory (default {DEFAULT_WORKDIR})")
    cmd.add_argument("--overlay-dir", help="where the parent's temporary overlays go "
                     "(default: beside each disk image)")
    cmd.add_argument("--keep", metavar="DIR", help="keep the clone's disks as standalone "
                     "qcow2 images, DIR/<vm name>/<disk>.qcow2")
    cmd.add_argument("--clone-console", metavar="FILE",
                     help="capture the clone's first serial port to FILE (debugging)")
    cmd.add_argument("--mount-root", metavar="DIR", help="where the clone's filesystems are "
                     "mounted (default WORKDIR/mnt/NAME)")
    cmd.add_argument("--collapse-huge-pages", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="rebuild the guest RAM's resident huge pages after the RAM snapshot "
                     "and, if needed, before the pause, and read it ahead of the pause (default): "
                     "a shorter background-snapshot pause, for some host CPU time (at most "
                     "collapse_budget s per pass)")
    cmd.add_argument("--min-free", metavar="SIZE",
                     help="space to leave free, beyond the RAM state, where the parent's "
                     "overlays and the work directory go; checked before the pause "
                     f"(e.g. 512M, 2G; default {MIN_FREE >> 30}G)")
    cmd.add_argument("--max-pause", type=float, metavar="SECONDS",
                     help="the longest pause of the VM allowed; a method that cannot keep "
                     "to it (stop-and-copy of a large RAM) is refused before pausing "
                     f"(default {MAX_PAUSE:g})")
    cmd.add_argument("--clone-drop", action="append", metavar="NAME",
                     help="leave an option kvmsnap refuses out of the clone, when it serves "
                     "the parent alone: an option (set) or object:TYPE (object:input-barrier); "
                     "repeatable")
    cmd.add_argument("--allow-remote-workdir", action="store_true", default=None,
                     help="accept a work directory on a network or FUSE filesystem (NFS, "
                     "CIFS, sshfs...): the guest's RAM, keys included, is written there")
    cmd.add_argument("--skip-partition", action="append", metavar="RULE",
                     dest="skip_partitions",
                     help="a partition known to be left out, so it does not warn (exit 1) "
                     "every night: label:NAME, uuid:UUID, type:GUID|0xNN|KIND|FSTYPE or "
                     "where:DISK/pN; repeatable")
    cmd.add_argument("--luks-key", action="append", metavar="UUID=FILE", dest="luks_keys",
                     help="the key file of the guest's LUKS volume UUID: files mode opens it "
                     "(read-only, through libguestfs) and archives its files; repeatable")


def add_many_vm_arguments(backup: argparse.ArgumentParser) -> None:
    backup.add_argument("--all", action="store_true", dest="all_domains",
                        help="every running libvirt domain (of --libvirt-uri)")
    backup.add_argument("--exclude", action="append", metavar="GLOB",
                        help="with --all: leave out the domains this name or glob matches "
                        "(repeatable)")
    backup.add_argument("--max-clones", type=int, metavar="N",
                        help="back up at most N VMs (clones) at once, as the host's free "
                        "RAM and space allow (default 1: one after another)")


def add_backup_arguments(backup: argparse.ArgumentParser) -> None:
    """What ``kvmsnap backup`` adds to the fork options: the VMs and their archivers."""
    backup.add_argument("--config", metavar="FILE", help="a TOML file listing VMs and "
                        f"archivers (e.g. {DEFAULT_CONFIG}); the options above, when given, "
                        "win over it for every VM")
    backup.add_argument("--vm", action="append", metavar="NAME",
                        help="with --config: only this [[vm]] (repeatable)")
    backup.add_argument("--borg", action="append", metavar="REPO", help="a borg repository")
    backup.add_argument("--restic", action="append", metavar="REPO",
                        help="a restic repository")
    backup.add_argument("--mode", choices=[m.value for m in Mode],
                        help="archive the mounted filesystems, raw disk images, or both "
                        f"(default {Mode.FILES})")
    backup.add_argument("--dry-run", action="store_true",
                        help="show what would be done, touching nothing")
    add_many_vm_arguments(backup)


def add_verify_arguments(verify: argparse.ArgumentParser) -> None:
    """``kvmsnap verify``: which backup, and what proves it came up (config keys verify_*)."""
    verify.add_argument("--borg", metavar="REPO::ARCHIVE", help="a borg archive (image: "
                        "booted; files: its trees and marker files checked)")
    verify.add_argument("--restic", metavar="REPO", help="a restic repository (image backups)")
    verify.add_argument("--run", help="with --restic: the backup's run id (default: latest)")
    verify.add_argument("--vm", help="with --restic: the latest backup of this VM; with "
                        "--config: only this [[vm]]")
    verify.add_argument("--command", metavar="ARGV", dest="verify_command",
                        help='run this in the guest through its agent; exit status 0: it came '
                        'up (split like a shell would, never run by one), e.g. "systemctl '
                        'is-system-running --wait"')
    verify.add_argument("--console", metavar="REGEX", dest="verify_console",
                        help='it came up when a console line matches, e.g. "login:|READY"')
    verify.add_argument("--timeout", type=float, metavar="SECONDS", dest="verify_timeout",
                        help="for the guest to come up, and again to shut down (default 600)")
    verify.add_argument("--file", action="append", metavar="PATH", dest="verify_files",
                        help="a files archive must hold this file (vdisk0/p1/etc/hostname)")
    verify.add_argument("--workdir", help=f"private work directory (default {DEFAULT_WORKDIR})")
    verify.add_argument("--clone-console", metavar="FILE",
                        help="keep the booted copy's console log here")
    verify.add_argument("--metrics", metavar="FILE", help="update the VM's kvmsnap_verify_* "
                        "series in this node_exporter textfile (the backups' metrics_file)")
    verify.add_argument("--config", metavar="FILE", help="without --borg/--restic: the "
                        "latest backup of each [[vm]] in this file (e.g. "
                        f"{DEFAULT_CONFIG}), with its verify_* keys; its [run] metrics_file "
                        "gets the results unless --metrics is given")


VERIFY_EXIT_CODES = ("exit codes: 0 proven; 1 verified and NOT proven (--json status: "
                     "did-not-boot, did-not-come-up, unclean-shutdown, filesystem-not-clean, "
                     "crash-consistent, incomplete); 2 could not verify (bad arguments, the "
                     "archive missing or unreadable, QEMU did not start)")


def add_restore_arguments(restore: argparse.ArgumentParser) -> None:
    restore.add_argument("--format", choices=["raw", "qcow2"],
                         help="the restored images' format (default: each disk's own; a "
                         "UEFI variable store stays raw)")
    restore.add_argument("--disk", action="append", default=[], metavar="DEVICE",
                         help="restore only this disk (repeatable; default: all)")
    restore.add_argument("--force", action="store_true",
                         help="overwrite images in a non-empty --to, or the definition of a "
                         "shut-off libvirt domain of the --name (never a running VM's)")
    restore.add_argument("--name", help="a libvirt VM's restored domain name "
                         "(default: <vm>-restored)")
    restore.add_argument("--define", action="store_true",
                         help="define the restored libvirt domain (its domain.xml)")
    restore.add_argument("--start", action="store_true",
                         help="define and start the restored libvirt domain")
    restore.add_argument("--libvirt-uri", default=DEFAULT_LIBVIRT_URI, metavar="URI",
                         help=f"where to define it (default {DEFAULT_LIBVIRT_URI})")
    restore.add_argument("--plug-nics", action="store_true",
                         help="keep the restored domain's NICs connected (default: link down)")
    restore.add_argument("--in-place", action="store_true",
                         help="over the VM's own images, as recorded (needs --force and the "
                         "VM shut off; --to then holds only the notes)")
