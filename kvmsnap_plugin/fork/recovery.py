"""The parent's chain given back after a crash, from what the journal recorded.

Online if the parent's QEMU still runs: resume it if our fork left it paused (after letting
an unfinished RAM snapshot end), then commit each overlay that is a disk's active layer and
delete the others (they never held a write). Offline if its QEMU is gone: ``qemu-img
commit`` each overlay into its frozen image, and point a libvirt domain's stored
configuration back at its images. Idempotent: recovery may itself be interrupted.
"""

from __future__ import annotations

from kvmsnap_plugin.backends import Backend, libvirt, qmp
from kvmsnap_plugin.fork import ram
from kvmsnap_plugin.fork.chain import commit_back, commit_offline, delete_overlay
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import MIGRATION_UNFINISHED, JournalState, Phase, Recovery


def give_back(state: JournalState, result: Recovery) -> None:
    """Resume the parent if we paused it and give it its disk chain back."""
    disks = list(state.overlays)
    if not disks and state.phase not in (Phase.FORKING, Phase.FORKED):
        return  # the run gave the chain back already: leave the VM's monitor alone
    with reopen(state) as backend:
        if not backend.online():
            commit_offline(disks, result)
            changed = backend.point_config_back(disks)
            if changed:
                result.did(f"pointed the configuration of {state.domain} back at its "
                           f"images ({', '.join(changed)})")
            return
        if state.phase is Phase.FORKING and process.same_process(state.parent):
            _resume(backend, result)
        _commit_online(backend, state, result)


def reopen(state: JournalState) -> Backend:
    """The backend of the parent a journal names (open it with ``with``)."""
    if state.backend == libvirt.LibvirtBackend.kind:
        return libvirt.reopen(state)
    return qmp.reopen(state)


def _resume(backend: Backend, result: Recovery) -> None:
    """The run died mid-fork: the parent may be paused, or still saving its RAM."""
    monitor = backend.monitor
    if monitor.execute("query-migrate").get("status") in MIGRATION_UNFINISHED:
        result.did(f"let an unfinished RAM snapshot end ({ram.settle_migration(monitor)})")
    was = ram.resume_if_paused(backend)
    if was:
        result.did(f"resumed the parent (it was {was})")
    ram.restore_capabilities(monitor, {})


def _commit_online(backend: Backend, state: JournalState, result: Recovery) -> None:
    disks = list(state.overlays)
    active = backend.active_overlays(disks)
    for commit in commit_back(backend, active):
        result.did(f"committed the parent's overlay of {commit.device} back")
    for disk in disks:
        if disk not in active:
            backend.detach_overlays([disk])
            if delete_overlay(disk):  # never the parent's layer: holds no guest data
                result.did(f"deleted the unused overlay {disk.parent_overlay.name}")
