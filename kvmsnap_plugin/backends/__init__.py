"""Where VMs come from: a bare QEMU with a QMP socket, or a libvirt domain.

The fork engine (:mod:`kvmsnap_plugin.fork`) is written once; a backend says only what
differs between the two: how to reach QEMU's monitor, how to pause and resume the VM (so
libvirt's idea of its state never drifts), how the disk snapshot and the commit back are
done, and how to find the VM again after a crash. The rest of the pipeline (clone,
shutdown, expose, archive, verify) does not know the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from kvmsnap_plugin.model import ForkedDisk, Parent
from kvmsnap_plugin.vm.qmp import Monitor


class Backend(Protocol):
    """One parent VM, opened as a context manager (``with backend: ...``)."""

    kind: str  # "qmp" or "libvirt": recorded in the journal

    @property
    def monitor(self) -> Monitor:
        """The parent's QEMU monitor (for the RAM snapshot and the run state)."""

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...

    def describe(self) -> Parent:
        """The VM, checked for clonability (raises VMError otherwise)."""

    def pause(self) -> None:
        """Stop the guest's CPUs."""

    def resume(self) -> None:
        """Let the guest's CPUs run again."""

    def attach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """Make the overlay files (they exist) known to QEMU before the pause, if needed."""

    def detach_overlays(self, planned: Sequence[ForkedDisk]) -> None:
        """Undo :meth:`attach_overlays` for overlays that are no disk's layer; never raises."""

    def snapshot_disks(self, planned: Sequence[ForkedDisk], name: str) -> None:
        """Put every planned overlay on top of its disk, all at one instant."""

    def commit_one(self, disk: ForkedDisk, timeout: float) -> int:
        """Live-commit one active overlay into its frozen image and pivot the disk back
        onto that image; the bytes copied."""

    def commit_below(self, disk: ForkedDisk, root: str, timeout: float) -> int:
        """Commit one overlay that another snapshot sits on (``root``: the node at the top
        of that chain) into its frozen image: the layer above then backs onto the frozen
        image and the overlay leaves the chain; the bytes copied."""

    def journal_fields(self) -> dict[str, Any]:
        """What :func:`reopen` needs to find this VM again after a crash."""

    def online(self) -> bool:
        """Does the VM's QEMU run (its chain can be given back live)?"""

    def offline_refusal(self, disks: Sequence[ForkedDisk]) -> str | None:
        """For a VM that is not running: why its overlays must not be committed offline
        (it is only suspended, elsewhere, or something still uses them), or None."""

    def point_config_back(self, disks: Sequence[ForkedDisk]) -> list[str]:
        """For a VM that is not running: make its stored configuration name the frozen
        images instead of the overlays; the devices changed."""
