"""The plugin contract: every ``kvmsnap_*`` hook, in the order a backup calls them.

Plugins implement hooks with ``@kvmsnap_plugin.hookimpl``; they are found through the
``kvmsnap`` entry-point group (``[project.entry-points.kvmsnap]``), and the built-in borg
and restic archivers are plugins like any other. A backup of one VM calls:

1. :func:`kvmsnap_archiver_types` (when the configuration is read)
2. :func:`kvmsnap_pre_backup` (before anything touches the VM; may veto)
3. :func:`kvmsnap_snapshot` (the fork point is taken; the parent runs again)
4. :func:`kvmsnap_post_shutdown` (the clone is down, its disks are exposed)
5. :func:`kvmsnap_archive` (once per archive target, while the disks are exposed)
6. :func:`kvmsnap_cleanup` (always, on success and on failure)

Each hook's arguments are keyword-only in spirit: an implementation may accept any subset of
them, by name. The argument types are the records of :mod:`kvmsnap_plugin.model`, named
below, and every one of them is importable from the package root: a plugin needs
``import kvmsnap_plugin`` and nothing deeper (``from kvmsnap_plugin import ArchiveResult``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvmsnap_plugin.model import (
        ArchiveResult,
        ArchiveTarget,
        BackupJob,
        BackupReport,
        Exposure,
        ForkPoint,
        Label,
        Parent,
    )

PROJECT = "kvmsnap"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvmsnap_archiver_types() -> dict[str, frozenset[str]]:
    """Declare the archiver types a plugin provides and the options each accepts.

    Runs when a configuration is read, before any VM is touched. Return a mapping from
    archiver type name (the ``type`` of an ``[archiver.NAME]`` table, or ``--borg``/
    ``--restic`` on the command line) to the option keys its table may hold besides
    ``type``. Unknown types and unknown keys are rejected with an error naming them.

    Not firstresult: the mappings of all plugins are merged; a type declared twice is an
    error.
    """


@hookspec
def kvmsnap_pre_backup(job: BackupJob, parent: Parent) -> str | None:
    """Before the fork: last checks; a chance to refuse.

    Runs after the VM was found and described (``parent``, a :class:`Parent` with its
    :class:`ParentDisk` list; ``job``, the :class:`BackupJob` with its
    :class:`ArchiveTarget` list) and before it is paused. A plugin may quiesce the guest
    here (e.g. guest-agent fsfreeze, thawed in :func:`kvmsnap_snapshot`).

    Return ``None`` to go ahead, or a string: the reason to skip this VM. A skip ends the
    backup of this VM without an error (exit code 75, borgmatic's soft failure);
    :func:`kvmsnap_cleanup` still runs. Raising an exception fails the backup.

    Not firstresult: every plugin is asked; the first reason given is reported.
    """


@hookspec
def kvmsnap_snapshot(job: BackupJob, fork: ForkPoint) -> None:
    """The fork point is taken: disks frozen, RAM saved, the parent runs again.

    ``fork`` (a :class:`ForkPoint`) holds the frozen images and the parent's temporary
    overlays (one :class:`ForkedDisk` each), the :class:`RamMethod` and the measured pause.
    The clone has not started yet. Thaw what :func:`kvmsnap_pre_backup` froze here.

    Not firstresult: every plugin is called; return values are ignored. An exception fails
    the backup (the parent is given its chain back first).
    """


@hookspec
def kvmsnap_post_shutdown(job: BackupJob, fork: ForkPoint, exposure: Exposure,
                          label: Label) -> None:
    """The clone has shut down and its disks are exposed read-only.

    ``exposure`` (an :class:`Exposure`): ``exposure.root`` holds one mounted tree per disk
    (``ROOT/<disk>`` or ``ROOT/<disk>/p<N>``); ``exposure.disks[i].image`` is a raw
    read-only view of each whole disk (an :class:`ExposedDisk`). ``label`` is
    :attr:`Label.CLEAN` (``"clean"``), or :attr:`Label.CRASH_CONSISTENT`
    (``"crash-consistent"``) when the clone did not shut down and policy allowed falling
    back to the frozen images. Runs before any archiver. Reads only: the disks are
    read-only, and the parent's chain is committed back after the last hook returns.

    Not firstresult: every plugin is called; return values are ignored. An exception fails
    the backup before any archiver runs.
    """


@hookspec(firstresult=True)
def kvmsnap_archive(job: BackupJob, target: ArchiveTarget, exposure: Exposure,
                    label: Label) -> list[ArchiveResult] | None:
    """Archive the exposed disks into one target; called once per configured target.

    Implement it for the archiver types you declared in :func:`kvmsnap_archiver_types`:
    return ``None`` for a ``target.type`` that is not yours. ``target`` is an
    :class:`ArchiveTarget`; its :class:`Mode` is ``"files"`` (archive the mounted trees
    under ``exposure.root``), ``"image"`` (one raw image per disk, from
    ``exposure.disks[i].image``) or ``"both"``. ``exposure`` and ``label`` are as in
    :func:`kvmsnap_post_shutdown`.

    firstresult: the first plugin returning a list of :class:`ArchiveResult` handles the
    target. Raise :class:`kvmsnap_plugin.ArchiveError` on failure: nothing partial may be
    left in the repository under the result's name.
    """


@hookspec
def kvmsnap_cleanup(job: BackupJob, report: BackupReport | None,
                    error: BaseException | None) -> None:
    """The backup of one VM is over; runs always, on success, skip and failure.

    By now kvmsnap has unmounted the disks, stopped the clone and committed the parent's
    overlays back. ``report`` is the :class:`BackupReport` (``None`` if the backup failed or
    was skipped before a report existed); ``error`` the exception that ended it, if any.
    Release what your plugin holds; do not raise (an exception here is logged, not
    propagated, so that every plugin's cleanup runs).

    Not firstresult: every plugin is called, the last registered first; return values are
    ignored.
    """
