"""``kvmsnap verify``: boot one backup in a sandbox (or check a files archive), say what it
proved, and put that in the metrics file as a backup run does. With ``--config`` and no
``--borg``/``--restic``: the latest backup of each configured VM (``--vm``: of one), what a
weekly timer runs (contrib/kvmsnap-verify.timer).

Exit codes: 0 proven; 1 the verification ran and the backup is NOT proven (``status``:
did-not-boot, did-not-come-up, unclean-shutdown, filesystem-not-clean, crash-consistent,
incomplete); 2 it could not be verified (an error: bad arguments, the archive not found or
unreadable, QEMU did not start; status ``unverifiable``). Many VMs: the worst.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from dataclasses import replace
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError, UsageError
from kvmsnap_plugin.model import BackupJob, RunSettings, VerifyReport, VerifySettings
from kvmsnap_plugin.paths import DEFAULT_WORKDIR

log = logging.getLogger(__name__)


def cmd_verify(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.run.metrics import write_verify_metrics
    from kvmsnap_plugin.run.verify import render, verify_borg, verify_restic

    if args.config and not (args.borg or args.restic):
        return verify_configured(args)
    if bool(args.borg) == bool(args.restic):
        raise UsageError("verify one backup", "pass --borg REPO::ARCHIVE or --restic REPO "
                         "(or --config FILE: the latest backup of each VM in it)")
    # the metrics file before the boot: a bad config file fails at once
    metrics = Path(args.metrics) if args.metrics else (
        _config(args)[1].metrics_file if args.config else None)
    settings = overridden(VerifySettings(True), args)
    where = {"workdir": Path(args.workdir or DEFAULT_WORKDIR),
             "console_copy": Path(args.clone_console) if args.clone_console else None}
    try:
        report = (verify_borg(args.borg, settings, **where) if args.borg else
                  verify_restic(args.restic, settings, run=args.run, vm=args.vm, **where))
    except KvmsnapError as exc:
        if args.vm:  # a scheduled verify of a VM's latest backup: its alert sees this
            failed = VerifyReport(args.vm, args.borg or args.restic, "image",
                                  reason=exc.one_line(), unverifiable=True)
            write_verify_metrics(metrics, failed, time.time())
        raise
    write_verify_metrics(metrics, report, time.time())
    print(json.dumps(report.as_dict(), indent=2, default=str) if args.json else render(report))
    return report.exit_code


def verify_configured(args: argparse.Namespace) -> int:
    """The latest backup of each VM of the config file (or of ``--vm``), one after another;
    one that cannot be verified does not stop the others. ``--json``: a list."""
    from kvmsnap_plugin.run.metrics import write_verify_metrics
    from kvmsnap_plugin.run.verify import render, verify_latest

    if args.run:
        raise UsageError("--run names one backup of one repository",
                         "pass --restic REPO --run ID, or drop --run")
    if args.clone_console and not args.vm:
        raise UsageError("--clone-console keeps one VM's console log",
                         "add --vm NAME, or drop --clone-console")
    jobs, run = _config(args)
    jobs = [j for j in jobs if args.vm in (None, j.name)]
    if not jobs:
        raise UsageError(f"no [[vm]] named {args.vm} in {args.config}")
    console = Path(args.clone_console) if args.clone_console else None
    reports = []
    for job in jobs:
        if args.workdir:
            job = replace(job, fork=replace(job.fork, workdir=Path(args.workdir)))
        try:
            report = verify_latest(job, overridden(job.verify, args), console)
        except KvmsnapError as exc:
            log.error("%s: could not verify: %s", job.name, exc.one_line())
            report = VerifyReport(job.name, "", "image", reason=exc.one_line(),
                                  unverifiable=True)
        write_verify_metrics(Path(args.metrics) if args.metrics else run.metrics_file,
                             report, time.time())
        reports.append(report)
    print(json.dumps([r.as_dict() for r in reports], indent=2, default=str) if args.json
          else "\n\n".join(render(r) for r in reports))
    return max(r.exit_code for r in reports)


def overridden(settings: VerifySettings, args: argparse.Namespace) -> VerifySettings:
    """The config's (or the default) verify settings, with what the command line gives."""
    given = {"command": tuple(shlex.split(args.verify_command or "")),
             "console": args.verify_console, "timeout": args.verify_timeout,
             "files": tuple(args.verify_files or ())}
    return replace(settings, enabled=True, **{k: v for k, v in given.items() if v})


def _config(args: argparse.Namespace) -> tuple[list[BackupJob], RunSettings]:
    from kvmsnap_plugin.config import load_config
    from kvmsnap_plugin.plugin.manager import Hooks

    return load_config(Path(args.config), Hooks().archiver_types())
