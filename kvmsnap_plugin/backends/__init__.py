"""Where VMs come from: a bare QEMU with a QMP socket, or a libvirt domain.

A parent backend gives the pipeline four things and hides how: a description of the VM
(:class:`~kvmsnap_plugin.vm.parent.Parent`), the fork point, the live commit that gives the
VM its disk chain back, and the recovery of an interrupted run from the journal. The rest
of the pipeline (clone, shutdown, expose, archive, verify) does not know the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kvmsnap_plugin.model import Commit, ForkedDisk, ForkPoint, JournalState, Parent, Phase


class ParentBackend(Protocol):
    kind: str

    def __enter__(self) -> ParentBackend: ...

    def __exit__(self, *exc: object) -> None: ...

    def describe(self) -> Parent:
        """The running VM, checked for clonability (raises VMError otherwise)."""

    def fork(self, parent: Parent, planned: tuple[ForkedDisk, ...], state_file: Path,
             method: str) -> ForkPoint:
        """Pause, snapshot disks and RAM at one instant, resume; undo on failure."""

    def commit_back(self, disks: Sequence[ForkedDisk]) -> list[Commit]:
        """Give the parent its chain back: live-commit each overlay, delete it."""

    def journal_fields(self) -> dict[str, Any]:
        """What :func:`restore_parent` needs to find this VM again after a crash."""


def restore_parent(state: JournalState, disks: list[ForkedDisk], result: Any) -> None:
    """Recovery: resume the parent if we paused it and commit its overlays back."""
    if not disks and state.phase not in (Phase.FORKING, Phase.FORKED):
        return  # the run gave the chain back already: leave the VM's monitor alone
    kind = state.backend
    if kind == "libvirt":
        from kvmsnap_plugin.backends import libvirt

        libvirt.restore(state, disks, result)
    else:
        from kvmsnap_plugin.backends import qmp

        qmp.restore(state, disks, result)
