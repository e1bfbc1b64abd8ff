"""What an archive says about the VM it came from: ``kvmsnap-vm.json``.

Written next to the clone's disks (in the mounted tree and beside the raw images) so every
archive carries it: the VM's name, its QEMU command line at backup time, its disks and the
fork's verdict. ``kvmsnap restore`` reads it back to say how to boot the restored images.
The command line is kept without its secrets (``-object secret`` data, passwords, RBD keys,
URL passwords: see :func:`~kvmsnap_plugin.host.secrets.redacted_argv`): an archive may be
read by whoever may restore, who must not learn the VM's credentials from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from kvmsnap_plugin.host.secrets import redacted_argv
from kvmsnap_plugin.model import ForkPoint, Label, RecordedDisk, VmRecord

#: what stands for a secret value in the recorded command line
REDACTED = "<redacted>"


def record_of(point: ForkPoint, run: str, label: Label, vm: str) -> VmRecord:
    """The record of one backup; ``taken_at`` is stamped now, seconds after the fork."""
    disks = [RecordedDisk(d.device, d.filename, d.format, d.virtual_size, d.flash)
             for d in point.parent.writable_disks]
    return VmRecord(vm, run, datetime.now(UTC).isoformat(timespec="seconds"), label,
                    point.method, without_secrets(point.parent.argv), disks,
                    domain_xml=point.parent.domain_xml)


def without_secrets(argv: Sequence[str]) -> list[str]:
    """A QEMU command line as kvmsnap writes it down or prints it (the VM record, the
    ``--dry-run`` plan): every secret value ``<redacted>``."""
    return redacted_argv(argv, REDACTED)
