"""The plugin manager, and a typed facade so call sites never touch ``pm.hook``.

One project name, ``kvmsnap``, for the markers, the PluginManager and the entry-point group
(as pytest and tox do). ``check_pending()`` turns a misspelt ``kvmsnap_*`` hook into an
error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

from kvmsnap_plugin.errors import ArchiveError, UsageError
from kvmsnap_plugin.plugin import hookspecs

if TYPE_CHECKING:
    import kvmsnap_plugin.model as model

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT
CLEANUP = "kvmsnap_cleanup"


def builtin_plugins() -> list[object]:
    from kvmsnap_plugin.plugin.archivers import borg, restic

    return [borg, restic]


def plugin_manager(extra: Iterable[object] = (), entry_points: bool = True) -> pluggy.PluginManager:
    """The hooks of the installed plugins, the built-in archivers and ``extra``.

    pluggy calls a hook's implementations last registered first. As in pluggy's own example,
    third-party plugins are loaded from entry points before the built-ins are registered, so
    the built-in archivers run first: their checks in ``kvmsnap_pre_backup`` (does the
    repository open?) fail a backup before a plugin has quiesced the guest, and in
    ``kvmsnap_cleanup`` they let go first, leaving the last word to the plugins that were
    there before them. ``extra`` (the embedding program's own plugins, e.g. a test's) is
    registered last and so called first, like the host's own code around the hooks.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in [*builtin_plugins(), *extra]:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise UsageError(f"a kvmsnap plugin implements an unknown hook: {exc}",
                         "fix the hook's name (see kvmsnap_plugin/plugin/hookspecs.py)") from None
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

    def pre_backup(self, job: model.BackupJob, parent: model.Parent) -> str | None:
        reasons = [r for r in self.pm.hook.kvmsnap_pre_backup(job=job, parent=parent) if r]
        return reasons[0] if reasons else None

    def snapshot(self, job: model.BackupJob, fork: model.ForkPoint) -> None:
        self.pm.hook.kvmsnap_snapshot(job=job, fork=fork)

    def post_shutdown(self, job: model.BackupJob, fork: model.ForkPoint,
                      exposure: model.Exposure, label: model.Label) -> None:
        self.pm.hook.kvmsnap_post_shutdown(job=job, fork=fork, exposure=exposure, label=label)

    def archive(self, job: model.BackupJob, target: model.ArchiveTarget,
                exposure: model.Exposure, label: model.Label) -> list[model.ArchiveResult]:
        results = self.pm.hook.kvmsnap_archive(job=job, target=target, exposure=exposure,
                                               label=label)
        if results is None:
            raise ArchiveError(f"no plugin archives targets of type {target.type!r}",
                               "install the plugin that provides it")
        return list(results)

    def cleanup(self, job: model.BackupJob, report: model.BackupReport | None,
                error: BaseException | None) -> None:
        """Every plugin's cleanup runs, even if another's raises.

        One call through pluggy per plugin, in pluggy's own order (last registered first),
        each leaving the other plugins' implementations out: wrappers and tracing still see
        every call, and one plugin's exception cannot stop the next plugin's cleanup.
        """
        impls = [impl for impl in self.pm.hook.kvmsnap_cleanup.get_hookimpls()
                 if not (impl.wrapper or impl.hookwrapper)]
        for impl in reversed(impls):
            others = [other.plugin for other in impls if other is not impl]
            try:
                self.pm.subset_hook_caller(CLEANUP, remove_plugins=others)(
                    job=job, report=report, error=error)
            except Exception as exc:  # a plugin's cleanup must not stop the others
                log.error("cleanup of plugin %s failed: %s", impl.plugin_name, exc)
