"""``kvmsnap verify``: boot one backup in a sandbox (or check a files archive), say what it
proved, and put that in the metrics file as a backup run does.

Exit codes: 0 proven; 1 the verification ran and the backup is NOT proven (``status``:
did-not-boot, did-not-come-up, unclean-shutdown, filesystem-not-clean, crash-consistent,
incomplete); 2 it could not be verified (an error: bad arguments, the archive not found or
unreadable, QEMU did not start; status ``unverifiable``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError, UsageError
from kvmsnap_plugin.model import VerifyReport, VerifySettings
from kvmsnap_plugin.paths import DEFAULT_WORKDIR


def cmd_verify(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.run.metrics import write_verify_metrics
    from kvmsnap_plugin.run.verify import render, verify_borg, verify_restic

    if bool(args.borg) == bool(args.restic):
        raise UsageError("verify one backup", "pass --borg REPO::ARCHIVE or --restic REPO")
    metrics = metrics_file(args)  # before the boot: a bad config file fails at once
    settings = VerifySettings(
        True, tuple(shlex.split(args.verify_command or "")), args.verify_console or "",
        **({"timeout": args.verify_timeout} if args.verify_timeout else {}),
        files=tuple(args.verify_files or ()))
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


def metrics_file(args: argparse.Namespace) -> Path | None:
    """``--metrics FILE``, else the ``[run] metrics_file`` of ``--config FILE`` (the one
    the backups write), else none."""
    if args.metrics:
        return Path(args.metrics)
    if not args.config:
        return None
    from kvmsnap_plugin.config import load_config
    from kvmsnap_plugin.plugin.manager import Hooks

    _jobs, run = load_config(Path(args.config), Hooks().archiver_types())
    return run.metrics_file
