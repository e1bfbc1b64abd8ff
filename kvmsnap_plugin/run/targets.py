"""Archive targets, each on its own: a repository that fails (full, gone, locked, a wrong
passphrase) never keeps the others from their archive, so the off-site copy is still made
when the local one fails. Every target is attempted; each one's result is reported (its
archives, or a :class:`~kvmsnap_plugin.model.TargetFailure` with the one-line reason).

Only when every target failed does the run fail as a whole, with the first target's error:
then no repository got anything, and a job of one target fails as it always did.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host.secrets import masked
from kvmsnap_plugin.model import (
    ArchiveResult,
    ArchiveTarget,
    BackupJob,
    Exposure,
    Label,
    Parent,
    TargetFailure,
)
from kvmsnap_plugin.plugin.manager import Hooks, builtin_plugins

log = logging.getLogger(__name__)


def failure_of(target: ArchiveTarget, exc: KvmsnapError) -> TargetFailure:
    log.error("%s (%s): %s", target.name, target.type, masked(exc.one_line()))
    return TargetFailure(target.name, target.type, masked(str(exc)), masked(exc.hint))


def checked_targets(job: BackupJob, hooks: Hooks,
                    parent: Parent) -> tuple[BackupJob, list[TargetFailure]]:
    """Before the VM is touched: with more than one target, each target's repository is
    checked on its own (the built-in archivers' checks: does it open?); the job goes on
    with the targets that passed, the others are reported. None passing raises the first
    target's error. Only the archivers' checks run here: a plugin that quiesces the guest in
    ``kvmsnap_pre_backup`` still runs once, afterwards, for the targets left."""
    if len(job.targets) < 2:
        return job, []
    builtins = builtin_plugins()
    others = [p for p in hooks.pm.get_plugins() if p not in builtins]
    check = hooks.pm.subset_hook_caller("kvmsnap_pre_backup", remove_plugins=others)
    passed, failures, errors = [], [], []
    for target in job.targets:
        try:
            check(job=replace(job, targets=(target,)), parent=parent)
            passed.append(target)
        except KvmsnapError as exc:
            errors.append(exc)
            failures.append(failure_of(target, exc))
    if not passed:
        raise errors[0]
    return replace(job, targets=tuple(passed)), failures


def archive_each(job: BackupJob, hooks: Hooks, exposure: Exposure,
                 label: Label) -> tuple[list[ArchiveResult], list[TargetFailure]]:
    """Every target of the job in turn, each whatever became of the ones before it."""
    results: list[ArchiveResult] = []
    failures: list[TargetFailure] = []
    first_error: KvmsnapError | None = None
    for target in job.targets:
        log.info("archiving %s into %s (%s, %s)", job.name, target.name, target.type,
                 target.mode)
        try:
            results += hooks.archive(job, target, exposure, label)
        except KvmsnapError as exc:
            first_error = first_error or exc
            failures.append(failure_of(target, exc))
    if first_error is not None and len(failures) == len(job.targets):
        raise first_error
    return results, failures
