"""The plugin manager, and a typed facade so call sites never touch ``pm.hook``.

One project name, ``kvmsnap``, for the markers, the PluginManager and the entry-point group
(as pytest and tox do). Built-in archivers are registered first, then third-party plugins
from entry points; ``check_pending()`` turns a misspelt ``kvmsnap_*`` hook into an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

from kvmsnap_plugin.errors import ArchiveError, UsageError
from kvmsnap_plugin.plugin import hookspecs

if TYPE_CHECKING:
    from kvmsnap_plugin.model import (
        ArchiveResult,
        ArchiveTarget,
        BackupJob,
        BackupReport,
        Exposure,
        ForkPoint,
        Parent,
    )

log = logging.getLogger("kvmsnap")

ENTRY_POINT_GROUP = hookspecs.PROJECT


def builtin_plugins() -> list[object]:
    from kvmsnap_plugin.plugin.archivers import borg, restic

    return [borg, restic]


def plugin_manager(extra: Iterable[object] = (), entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in builtin_plugins():
        pm.register(plugin)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"a kvmsnap plugin implements an unknown hook: {exc}",
                         "fix the hook's name (see kvmsnap_plugin/hookspecs.py)") from None
    return pm


class Hooks:
    """Typed calls into the plugins."""

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm or plugin_manager()

    def archiver_types(self) -> dict[str, frozenset[str]]:
        merged: dict[str, frozenset[str]] = {}
        for declared in self.pm.hook.kvmsnap_archiver_types():
            for name, keys in declared.items():
                if name in merged:
                    raise UsageError(f"two plugins declare the archiver type {name!r}",
                                     "uninstall one of them")
                merged[name] = frozenset(keys)
        return merged

    def pre_backup(self, job: BackupJob, parent: Parent) -> str | None:
        reasons = [r for r in self.pm.hook.kvmsnap_pre_backup(job=job, parent=parent) if r]
        return reasons[0] if reasons else None

    def snapshot(self, job: BackupJob, fork: ForkPoint) -> None:
        self.pm.hook.kvmsnap_snapshot(job=job, fork=fork)

    def post_shutdown(self, job: BackupJob, fork: ForkPoint, exposure: Exposure,
                      label: str) -> None:
        self.pm.hook.kvmsnap_post_shutdown(job=job, fork=fork, exposure=exposure, label=label)

    def archive(self, job: BackupJob, target: ArchiveTarget, exposure: Exposure,
                label: str) -> list[ArchiveResult]:
        results = self.pm.hook.kvmsnap_archive(job=job, target=target, exposure=exposure,
                                               label=label)
        if results is None:
            raise ArchiveError(f"no plugin archives targets of type {target.type!r}",
                               "install the plugin that provides it")
        return list(results)

    def cleanup(self, job: BackupJob, report: BackupReport | None,
                error: BaseException | None) -> None:
        """Every plugin's cleanup runs, even if another's raises."""
        arguments = {"job": job, "report": report, "error": error}
        for impl in reversed(self.pm.hook.kvmsnap_cleanup.get_hookimpls()):
            try:
                impl.function(**{name: arguments[name] for name in impl.argnames})
            except Exception as exc:  # a plugin's cleanup must not stop the others
                log.error("cleanup of plugin %s failed: %s", impl.plugin_name, exc)
