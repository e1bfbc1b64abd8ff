"""The `kvmsnap` command.

Exit codes: 0 success; 1 success with a warning (e.g. a labelled crash-consistent
fallback); 2 error; 75 deliberate skip (borgmatic's soft failure); 130 interrupted.
Errors print one line with the cause and the fix; tracebacks only with --debug.
With --config, options given on the command line win over the file, for every VM; so their
defaults here are None ("not given") and the model's defaults apply in one place.
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

from kvmsnap_plugin.cli.options import (
    VERIFY_EXIT_CODES,
    add_backup_arguments,
    add_fork_arguments,
    add_global_arguments,
    add_restore_arguments,
    add_verify_arguments,
    add_vm_arguments,
)
from kvmsnap_plugin.cli.verify import cmd_verify
from kvmsnap_plugin.errors import KvmsnapError, SkipBackup, UsageError
from kvmsnap_plugin.host.secrets import masked
from kvmsnap_plugin.model import DEFAULT_LIBVIRT_URI, VERSION
from kvmsnap_plugin.paths import DEFAULT_CONFIG
from kvmsnap_plugin.run.logs import log_handler

if TYPE_CHECKING:
    from kvmsnap_plugin.model import (
        ArchiveTarget,
        BackupJob,
        RunSettings,
        VmOutcome,
    )
    from kvmsnap_plugin.plugin.manager import Hooks

EXIT_OK, EXIT_WARNING, EXIT_ERROR, EXIT_SKIP, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
#: options that are config keys too (command line and [defaults]/[[vm]] share the names)
SETTINGS = ("method", "shutdown_timeout", "repress_after", "on_unclean", "keep", "workdir",
            "overlay_dir", "clone_console", "mount_root", "collapse_huge_pages", "min_free",
            "max_pause", "clone_drop", "allow_remote_workdir", "skip_partitions", "luks_keys")

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
    options = fork_options({**_settings(args), "pid": args.pid})
    dry_run = getattr(args, "dry_run", False)
    if args.domain:
        return BackupJob(args.name or args.domain, None, options, tuple(targets),
                         dry_run=dry_run, domain=args.domain,
                         libvirt_uri=args.libvirt_uri or DEFAULT_LIBVIRT_URI)
    socket = find_parent_socket(args.qmp)  # without --name, the VM's own name (-name, UUID)
    return BackupJob(args.name or str(socket), socket, options, tuple(targets),
                     dry_run=dry_run, name_given=bool(args.name))


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The options given (not None), by their config keys."""
    given = {key: getattr(args, key) for key in SETTINGS if getattr(args, key, None) is not None}
    if "luks_keys" in given:  # --luks-key UUID=FILE, as the config's table
        given["luks_keys"] = dict(item.partition("=")[::2] for item in given["luks_keys"])
    return given


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
    uri = args.libvirt_uri or DEFAULT_LIBVIRT_URI
    job = (BackupJob(args.domain, None, domain=args.domain, libvirt_uri=uri)
           if args.domain else BackupJob(args.qmp, Path(args.qmp)))
    done = release(job)
    print(json.dumps(asdict(done), indent=2) if args.json else
          "\n".join(f"{done.vm}: {action}" for action in done.actions))
    return EXIT_OK


def cmd_recover(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.run.recovery import recover_all

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
    from kvmsnap_plugin.run.restore import RestoreOptions, restore_borg, restore_restic

    if bool(args.borg) == bool(args.restic):
        raise UsageError("restore from one place", "pass --borg REPO::ARCHIVE or --restic REPO")
    to = Path(args.to)
    options = RestoreOptions(args.format, tuple(args.disk), args.force, args.name,
                             args.define, args.start, args.libvirt_uri, args.plug_nics,
                             args.in_place)
    done = (restore_borg(args.borg, to, options) if args.borg else
            restore_restic(args.restic, to, run=args.run, vm=args.vm, options=options))
    print(json.dumps(asdict(done), indent=2) if args.json else done.render())
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.config import EXAMPLE, load_config
    from kvmsnap_plugin.plugin.manager import Hooks

    if args.action == "example":
        print(EXAMPLE, end="")
        return EXIT_OK
    jobs, _run = load_config(Path(args.config), Hooks().archiver_types())
    print(json.dumps({"config": args.config, "vms": [j.name for j in jobs]}) if args.json
          else f"{args.config}: valid; {len(jobs)} VM(s): {', '.join(j.name for j in jobs)}")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.plugin.manager import Hooks

    hooks = Hooks()
    types = hooks.archiver_types()
    if args.config:
        jobs, settings = _jobs_from_config(args, types)
        return run_jobs(jobs, args, hooks, settings)
    if args.all_domains:
        return run_jobs(_all_domain_jobs(args, types), args, hooks)
    return run_jobs([_job_with_targets(args, types)], args, hooks)


def _all_domain_jobs(args: argparse.Namespace,
                     types: dict[str, frozenset[str]]) -> list[BackupJob]:
    """``--all``: a job per running libvirt domain, with the command line's settings."""
    from kvmsnap_plugin.config import command_line_targets
    from kvmsnap_plugin.run.discover import domain_jobs

    if args.qmp or args.domain or args.name:
        raise UsageError("--all names the VMs itself", "drop --qmp, --domain and --name")
    targets = command_line_targets(args.borg or [], args.restic or [], args.mode, types)
    if not targets:
        raise UsageError("no archive target given", "pass --borg REPO and/or --restic REPO")
    template = _job_from_args(argparse.Namespace(**{**vars(args), "domain": "*"}), targets)
    return domain_jobs([template], args.libvirt_uri or DEFAULT_LIBVIRT_URI,
                       tuple(args.exclude or ()))


def _jobs_from_config(args: argparse.Namespace, types: dict[str, frozenset[str]]
                      ) -> tuple[list[BackupJob], RunSettings]:
    from kvmsnap_plugin.config import load_config
    from kvmsnap_plugin.run.discover import domain_jobs, is_glob

    alone = [flag for flag in ("qmp", "domain", "borg", "restic", "name", "pid")
             if getattr(args, flag)]
    if alone:
        raise UsageError(f"--config cannot be combined with --{alone[0]}: it names one VM "
                         "or its archivers", "put the VM and its archivers in the config file")
    overrides = {**_settings(args), "mode": args.mode, "libvirt_uri": args.libvirt_uri}
    jobs, run = load_config(Path(args.config), types, overrides)
    run = replace(run, all_domains=run.all_domains or args.all_domains,
                  exclude=tuple(args.exclude or run.exclude))
    if run.all_domains or any(is_glob(j.domain) for j in jobs):
        jobs = domain_jobs(jobs, run.libvirt_uri, run.exclude, all_domains=run.all_domains)
    if args.vm:
        jobs = [j for j in jobs if j.name in args.vm]
        if not jobs:
            raise UsageError(f"no [[vm]] named {', '.join(args.vm)} in {args.config}")
    return ([replace(j, dry_run=True) for j in jobs] if args.dry_run else jobs), run


def _job_with_targets(args: argparse.Namespace, types: dict[str, frozenset[str]]) -> BackupJob:
    from kvmsnap_plugin.config import command_line_targets

    if not (args.qmp or args.domain):
        raise UsageError("no VM given", "pass --qmp SOCKET, --domain NAME or --config FILE")
    targets = command_line_targets(args.borg or [], args.restic or [], args.mode, types)
    if not targets:
        raise UsageError("no archive target given",
                         "pass --borg REPO and/or --restic REPO (or use `kvmsnap fork`)")
    return _job_from_args(args, targets)


def run_jobs(jobs: list[BackupJob], args: argparse.Namespace, hooks: Hooks | None = None,
             settings: RunSettings | None = None,
             on_done: Callable[[BackupJob, VmOutcome], None] | None = None) -> int:
    """Back up the VMs, at most ``max_clones`` at once within the host's budget (see
    run/fleet.py); one VM's failure does not stop the others. Every VM gets an outcome:
    ``--json`` prints it (one VM: its object; many: the list) even when VMs fail."""
    from kvmsnap_plugin.model import RunSettings
    from kvmsnap_plugin.run.fleet import backup_or_plan, run_fleet, show_outcomes, summary_code
    from kvmsnap_plugin.run.metrics import write_metrics
    from kvmsnap_plugin.run.notify import after_vm

    settings = settings or RunSettings()
    if getattr(args, "max_clones", None) is not None:
        settings = replace(settings, max_clones=args.max_clones)
    outcomes = run_fleet(jobs, settings, backup_or_plan(hooks), on_done or after_vm)
    write_metrics(settings, outcomes)
    show_outcomes(outcomes, as_json=args.json)
    return summary_code([o.exit_code for o in outcomes])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmsnap",
        description="Consistent backups of running QEMU/KVM guests: fork the guest, shut "
                    "the copy down cleanly, archive its disks.",
        epilog="exit codes: 0 ok, 1 warning, 2 error, 75 skipped, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"kvmsnap {VERSION}")
    add_global_arguments(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str):
        cmd = sub.add_parser(name, help=text, description=text)
        add_global_arguments(cmd, default=argparse.SUPPRESS)  # after the command, too
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
    add_restore_arguments(restore)
    verify = add("verify", cmd_verify, "boot a backup in a sandbox and prove it comes up "
                 "(image), or that it holds its files (files)")
    verify.epilog = VERIFY_EXIT_CODES
    add_verify_arguments(verify)
    recover = add("recover", cmd_recover, "finish or undo every interrupted kvmsnap run on "
                  "this host")
    recover.add_argument("--force", action="store_true",
                         help="also take down split backups still mounted for their reader "
                         "(`kvmsnap mount` without `kvmsnap release`)")
    config = add("config", cmd_config, "check a configuration file (validate), or print a "
                 "commented example of one (example)")
    config.add_argument("action", choices=["validate", "example"])
    config.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE",
                        help=f"the file to validate (default {DEFAULT_CONFIG})")
    backup = add("backup", cmd_backup, "back up running VMs consistently into borg/restic")
    add_fork_arguments(backup)
    add_backup_arguments(backup)
    return parser


def setup_logging(debug: bool, quiet: bool, destination: str | None = None) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    root.handlers[:] = [log_handler(destination)]
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
    setup_logging(args.debug, args.quiet, args.log)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except KvmsnapError as exc:
        if args.debug:
            log.exception("failed")
        print(f"kvmsnap: skipped: {masked(str(exc))}" if isinstance(exc, SkipBackup)
              else f"kvmsnap: error: {masked(exc.one_line())}", file=sys.stderr)
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
