"""The parent's chain given back after a crash, from what the journal recorded.

Online if the parent's QEMU still runs: resume it if our fork left it paused (after letting
our unfinished RAM snapshot end: a migration kvmsnap did not start is never touched), put
its migration settings back, then give each overlay back where QEMU's block graph says it
is (:func:`~kvmsnap_plugin.fork.chain.give_back_chain`). Offline if its QEMU is gone:
``qemu-img commit`` each overlay that holds writes into its frozen image, only if that
image is unchanged since the fork and the VM is really shut off (a libvirt domain may be
merely suspended), then point a libvirt domain's stored configuration back at its images.
Idempotent: recovery may itself be interrupted.
"""

from __future__ import annotations

from kvmsnap_plugin.backends import Backend, libvirt, qmp
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.fork import ram
from kvmsnap_plugin.fork.chain import commit_offline, delete_overlay, give_back_chain
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import MIGRATION_UNFINISHED, JournalState, Phase, Recovery


def give_back(state: JournalState, result: Recovery) -> None:
    """Resume the parent if we paused it and give it its disk chain back."""
    if not state.overlays and not state.migration_settings and \
            state.phase not in (Phase.FORKING, Phase.FORKED):
        return  # the run gave the chain back already: leave the VM's monitor alone
    with reopen(state) as backend:
        if not backend.online():
            _give_back_offline(backend, state, result)
            return
        if state.phase is Phase.FORKING and process.same_process(state.parent):
            _resume(backend, state, result)
        _commit_online(backend, state, result)
        if state.migration_settings is not None:
            if not ram.restore_settings(backend.monitor, state.migration_settings):
                raise VMError("could not put the VM's migration settings back (see the "
                              "warning above); the journal keeps them",
                              "run `kvmsnap recover` again once no other migration runs")
            result.did("put the VM's migration settings back")


def reopen(state: JournalState) -> Backend:
    """The backend of the parent a journal names (open it with ``with``)."""
    if state.backend == libvirt.LibvirtBackend.kind:
        return libvirt.reopen(state)
    return qmp.reopen(state)


def _resume(backend: Backend, state: JournalState, result: Recovery) -> None:
    """The run died mid-fork: the parent may be paused, or still saving its RAM."""
    monitor = backend.monitor
    if monitor.execute("query-migrate").get("status") in MIGRATION_UNFINISHED:
        if state.migration_started:
            result.did(f"let an unfinished RAM snapshot end ({ram.settle_migration(monitor)})")
        else:
            result.did("left alone a migration that kvmsnap did not start")
    # Without a RAM snapshot of ours, only a plain pause is ours to end: a VM in
    # postmigrate was moved by someone else's migration.
    was = ram.resume_if_paused(backend, states=ram.PAUSED if state.migration_started
                               else ("paused",))
    if was:
        result.did(f"resumed the parent (it was {was})")
    if state.migration_settings is None:
        ram.restore_settings(monitor, {})  # a journal without them: at least not ours on


def _commit_online(backend: Backend, state: JournalState, result: Recovery) -> None:
    disks = list(state.overlays)
    existed = {disk.parent_overlay: disk.parent_overlay.exists() for disk in disks}
    commits, stopped = give_back_chain(backend, disks)
    for disk, commit in zip(disks, commits, strict=True):
        if commit.layer == "active":
            result.did(f"committed the parent's overlay of {commit.device} back")
        elif commit.layer == "below":
            result.did(f"committed the parent's overlay of {commit.device} back through the "
                       "middle of its chain (another snapshot sits on top of it)")
        elif existed[disk.parent_overlay]:  # never the parent's layer: held no guest data
            result.did(f"deleted the unused overlay {disk.parent_overlay.name}")
    if stopped:
        result.did(f"the VM had stopped on an I/O error ({stopped}); resumed it once its "
                   "writes were back in its images")


def _give_back_offline(backend: Backend, state: JournalState, result: Recovery) -> None:
    """Its QEMU is gone: commit into the frozen images, point the configuration back at
    them, and only then delete the overlays."""
    disks = list(state.overlays)
    refusal = backend.offline_refusal(disks)
    if refusal:
        raise VMError(f"{refusal}: its overlays hold writes it still needs and are kept",
                      "start or restore it where it is, then run `kvmsnap recover` (it then "
                      "commits them back while it runs); never delete them by hand")
    commit_offline(disks, result)
    changed = backend.point_config_back(disks)
    if changed:
        result.did(f"pointed the configuration of {state.domain} back at its "
                   f"images ({', '.join(changed)})")
    for disk in disks:
        delete_overlay(disk, None)  # the VM is off and every write is in its image
