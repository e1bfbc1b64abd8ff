"""The `kvmsnap` command.

Exit codes: 0 success; 1 success with a warning (e.g. a labelled crash-consistent
fallback); 2 error; 75 deliberate skip (borgmatic's soft failure); 130 interrupted.
Errors print one line with the cause and the fix; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvmsnap_plugin.errors import KvmsnapError, UsageError
from kvmsnap_plugin.host.secrets import MaskingFormatter, masked
from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
    MAX_PAUSE,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    VERSION,
    Mode,
    OnUnclean,
    Plan,
    RamMethod,
)
from kvmsnap_plugin.paths import DEFAULT_WORKDIR

if TYPE_CHECKING:
    from kvmsnap_plugin.model import ArchiveTarget, BackupJob, BackupReport
    from kvmsnap_plugin.plugin.manager import Hooks

EXIT_OK, EXIT_WARNING, EXIT_ERROR, EXIT_SKIP, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
#: what --method offers: a shut-off VM is found, not asked for
METHODS = [m.value for m in RamMethod if m is not RamMethod.OFFLINE]

log = logging.getLogger(__name__)


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.host import doctor

    checks = doctor.run_checks()
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        print(doctor.render(checks))
    return EXIT_ERROR if any(c.status == "fail" for c in checks) else EXIT_OK


def _job_from_args(args: argparse.Namespace,
                   targets: Sequence[ArchiveTarget] = ()) -> BackupJob:
    from kvmsnap_plugin.config import fork_options
    from kvmsnap_plugin.model import BackupJob
    from kvmsnap_plugin.vm.parent import find_parent_socket

    if bool(args.qmp) == bool(args.domain):
        raise UsageError("name one VM", "pass --qmp SOCKET or --domain NAME")
    settings = {key: getattr(args, key) for key in (
        "method", "shutdown_timeout", "repress_after", "on_unclean", "keep", "workdir",
        "overlay_dir", "clone_console", "pid", "mount_root", "collapse_huge_pages",
        "min_free", "max_pause", "clone_drop",
        "allow_remote_workdir", "skip_partitions", "luks_keys")
        if getattr(args, key, None) is not None}
    dry_run = getattr(args, "dry_run", False)
    if args.domain:
        return BackupJob(args.name or args.domain, None, fork_options(settings),
                         tuple(targets), dry_run=dry_run, domain=args.domain,
                         libvirt_uri=args.libvirt_uri)
    socket = find_parent_socket(args.qmp)
    return BackupJob(args.name or socket.stem, socket, fork_options(settings), tuple(targets),
                     dry_run=dry_run)


def cmd_fork(args: argparse.Namespace) -> int:
    return run_jobs([_job_from_args(args)], args)


def cmd_mount(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.errors import SkipBackup
    from kvmsnap_plugin.run.pipeline import mount
    from kvmsnap_plugin.run.report import render_report

    if args.skip_missing and args.qmp and not Path(args.qmp).exists():
        raise SkipBackup(f"{args.qmp} does not exist: the VM is not running; skipping")
    report = mount(_job_from_args(args))
    print(json.dumps(report.as_dict(), indent=2, default=str) if args.json
          else render_report(report))
    return EXIT_OK if report.clean and not report.warnings else EXIT_WARNING


def cmd_release(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.model import BackupJob
    from kvmsnap_plugin.run.pipeline import release

    if bool(args.qmp) == bool(args.domain):
        raise UsageError("name one VM", "pass --qmp SOCKET or --domain NAME, as to mount")
    job = (BackupJob(args.domain, None, domain=args.domain, libvirt_uri=args.libvirt_uri)
           if args.domain else BackupJob(args.qmp, Path(args.qmp)))
    done = release(job)
    print(json.dumps(asdict(done), indent=2) if args.json else
          "\n".join(f"{done.vm}: {action}" for action in done.actions))
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.run.pipeline import recover_all

    results = recover_all(force=args.force)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            for line in r.actions:
                print(f"{r.vm}: {line}")
            for line in r.problems:
                print(f"{r.vm}: PROBLEM: {line}")
        if not results:
            print("nothing to recover")
    return EXIT_ERROR if any(r.problems for r in results) else EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.run.restore import restore_borg, restore_restic

    if bool(args.borg) == bool(args.restic):
        raise UsageError("restore from one place", "pass --borg REPO::ARCHIVE or --restic REPO")
    to = Path(args.to)
    done = (restore_borg(args.borg, to) if args.borg else
            restore_restic(args.restic, to, run=args.run, vm=args.vm))
    print(json.dumps(asdict(done), indent=2) if args.json else done.render())
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.plugin.manager import Hooks

    hooks = Hooks()
    types = hooks.archiver_types()
    jobs = _jobs_from_config(args, types) if args.config else [_job_with_targets(args, types)]
    return run_jobs(jobs, args, hooks)


def _jobs_from_config(args: argparse.Namespace,
                      types: dict[str, frozenset[str]]) -> list[BackupJob]:
    from kvmsnap_plugin.config import load_config

    if args.qmp or args.domain or args.borg or args.restic:
        raise UsageError("--config cannot be combined with --qmp, --domain, --borg or "
                         "--restic",
                         "put the VM and its archivers in the config file")
    jobs = load_config(Path(args.config), types)
    if args.vm:
        jobs = [j for j in jobs if j.name in args.vm]
        if not jobs:
            raise UsageError(f"no [[vm]] named {', '.join(args.vm)} in {args.config}")
    return [replace(j, dry_run=True) for j in jobs] if args.dry_run else jobs


def _job_with_targets(args: argparse.Namespace, types: dict[str, frozenset[str]]) -> BackupJob:
    from kvmsnap_plugin.config import command_line_targets

    if not (args.qmp or args.domain):
        raise UsageError("no VM given", "pass --qmp SOCKET, --domain NAME or --config FILE")
    targets = command_line_targets(args.borg or [], args.restic or [], args.mode, types)
    if not targets:
        raise UsageError("no archive target given",
                         "pass --borg REPO and/or --restic REPO (or use `kvmsnap fork`)")
    return _job_from_args(args, targets)


def run_jobs(jobs: list[BackupJob], args: argparse.Namespace, hooks: Hooks | None = None) -> int:
    """Back up each VM in turn; one VM's failure does not stop the others."""
    outputs, codes = [], []
    for job in jobs:
        try:
            result, code = _run_job(job, hooks)
            codes.append(code)
            outputs.append({"vm": job.name, "status": "ok", **result.as_dict()} if args.json
                           else _render(result))
        except KvmsnapError as exc:
            if len(jobs) == 1:
                raise
            print(f"kvmsnap: error: {job.name}: {masked(exc.one_line())}", file=sys.stderr)
            codes.append(exc.exit_code)
            outputs.append({"vm": job.name, "status": "error", "error": masked(str(exc)),
                            "fix": masked(exc.hint)} if args.json else f"{job.name}: FAILED")
    if args.json:
        print(json.dumps(outputs[0] if len(outputs) == 1 else outputs, indent=2, default=str))
    else:
        print("\n".join(outputs))
    return worst(codes)


def _run_job(job: BackupJob, hooks: Hooks | None) -> tuple[BackupReport | Plan, int]:
    """A backup, or with --dry-run its plan; and the exit code it earns."""
    from kvmsnap_plugin.run.pipeline import backup, plan

    if job.dry_run:
        return plan(job), EXIT_OK
    report = backup(job, hooks)
    return report, EXIT_OK if report.clean and not report.warnings else EXIT_WARNING


def _render(result: BackupReport | Plan) -> str:
    from kvmsnap_plugin.run.report import render_plan, render_report

    return render_plan(result) if isinstance(result, Plan) else render_report(result)


def worst(codes: list[int]) -> int:
    """Error beats warning beats skip beats success."""
    for code in (EXIT_ERROR, EXIT_WARNING, EXIT_SKIP):
        if code in codes:
            return code
    return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_ERROR


def add_vm_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--qmp", metavar="SOCKET", help="a bare QEMU's QMP unix socket")
    cmd.add_argument("--domain", metavar="NAME", help="a libvirt domain")
    cmd.add_argument("--libvirt-uri", default=DEFAULT_LIBVIRT_URI, metavar="URI",
                     help=f"with --domain (default {DEFAULT_LIBVIRT_URI})")


def add_fork_arguments(cmd: argparse.ArgumentParser) -> None:
    add_vm_arguments(cmd)
    cmd.add_argument("--name", help="the VM's name in archives (default: the socket's name)")
    cmd.add_argument("--pid", type=int, help="the QEMU process (default: from the socket)")
    cmd.add_argument("--method", choices=METHODS, default=RamMethod.AUTO.value,
                     help="how to snapshot RAM (default: background if the host supports it)")
    cmd.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT,
                     metavar="SECONDS", help="power button to a stopped clone, at most "
                     f"(default {SHUTDOWN_TIMEOUT:g})")
    cmd.add_argument("--repress-after", type=float, default=REPRESS_AFTER, metavar="SECONDS",
                     help=f"press the power button again after this long "
                     f"(default {REPRESS_AFTER:g})")
    cmd.add_argument("--on-unclean", choices=[o.value for o in OnUnclean],
                     default=OnUnclean.FAIL.value,
                     help=f"when the clone does not shut down: {OnUnclean.FAIL} (default), or "
                     f"use the {OnUnclean.CRASH_CONSISTENT} images, labelled as such "
                     "(exit code 1)")
    cmd.add_argument("--workdir", help=f"private work directory (default {DEFAULT_WORKDIR})")
    cmd.add_argument("--overlay-dir", help="where the parent's temporary overlays go "
                     "(default: beside each disk image)")
    cmd.add_argument("--keep", metavar="DIR", help="keep the clone's disks as standalone "
                     "qcow2 images in DIR")
    cmd.add_argument("--clone-console", metavar="FILE",
                     help="capture the clone's first serial port to FILE (debugging)")
    cmd.add_argument("--mount-root", metavar="DIR", help="where the clone's filesystems are "
                     "mounted (default WORKDIR/mnt/NAME)")
    cmd.add_argument("--collapse-huge-pages", action="store_true",
                     help="rebuild the guest RAM's huge pages before the pause: a shorter "
                     "pause for back-to-back background snapshots, for some host CPU time")
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
    cmd.add_argument("--allow-remote-workdir", action="store_true",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmsnap",
        description="Consistent backups of running QEMU/KVM guests: fork the guest, shut "
                    "the copy down cleanly, archive its disks.",
        epilog="exit codes: 0 ok, 1 warning, 2 error, 75 skipped, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"kvmsnap {VERSION}")
    parser.add_argument("--debug", action="store_true", help="debug log and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.set_defaults(func=func)
        return cmd

    add("doctor", cmd_doctor, "check what this host can do and what to install")
    add_fork_arguments(add("fork", cmd_fork, "fork a running VM, shut the clone down "
                           "cleanly and report its disks' verdicts"))
    mount = add("mount", cmd_mount, "fork a VM and leave its clone's filesystems mounted "
                "read-only for another tool (borgmatic, a restic script); undo with release")
    add_fork_arguments(mount)
    mount.add_argument("--skip-missing", action="store_true",
                       help="exit 75 (skip softly) when the QMP socket does not exist")
    release = add("release", cmd_release, "unmount what `kvmsnap mount` left and give the "
                  "parent its disk chain back")
    add_vm_arguments(release)
    restore = add("restore", cmd_restore, "turn an image backup back into bootable disk "
                  "images, with a note of how to boot them")
    restore.add_argument("--borg", metavar="REPO::ARCHIVE", help="a borg ...-image archive")
    restore.add_argument("--restic", metavar="REPO", help="a restic repository")
    restore.add_argument("--run", help="with --restic: the backup's run id (default: latest)")
    restore.add_argument("--vm", help="with --restic: the latest backup of this VM")
    restore.add_argument("--to", required=True, metavar="DIR", help="an empty directory")
    recover = add("recover", cmd_recover, "finish or undo every interrupted kvmsnap run on "
                  "this host")
    recover.add_argument("--force", action="store_true",
                         help="also take down split backups still mounted for their reader "
                         "(`kvmsnap mount` without `kvmsnap release`)")
    backup = add("backup", cmd_backup, "back up running VMs consistently into borg/restic")
    add_fork_arguments(backup)
    backup.add_argument("--config", metavar="FILE", help="a TOML file listing VMs and archivers")
    backup.add_argument("--vm", action="append", metavar="NAME",
                        help="with --config: only this [[vm]] (repeatable)")
    backup.add_argument("--borg", action="append", metavar="REPO", help="a borg repository")
    backup.add_argument("--restic", action="append", metavar="REPO",
                        help="a restic repository")
    backup.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.FILES.value,
                        help="archive the mounted filesystems, raw disk images, or both")
    backup.add_argument("--dry-run", action="store_true",
                        help="show what would be done, touching nothing")
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("kvmsnap: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        # qemu.qmp logs every disconnect at WARNING; our own messages say what matters.
        logging.getLogger("qemu").setLevel(logging.CRITICAL)
    # sh announces every process at INFO; ours are logged (masked) at DEBUG already.
    logging.getLogger("sh").setLevel(logging.WARNING)


def _terminated(signum: int, frame: object) -> None:
    # SIGTERM (systemd stopping the service) unwinds like Ctrl-C: every cleanup runs.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run ``args.func``, and turn errors into one line and an exit code."""
    args = parser.parse_args(argv)
    setup_logging(args.debug, args.quiet)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except KvmsnapError as exc:
        if args.debug:
            log.exception("failed")
        print(f"kvmsnap: error: {masked(exc.one_line())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvmsnap: interrupted; everything started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"kvmsnap: internal error: {type(exc).__name__}: {exc} "
              "(fix: run again with --debug and report the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
