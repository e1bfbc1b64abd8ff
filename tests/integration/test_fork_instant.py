"""One instant for disks and RAM, seen from inside the guest, on each QEMU build.

The demo guest (``instant=True``) counts its workload lines in a shell variable (in RAM,
echoed on the console as ``KVMSNAP-COUNT n``) and writes each number with O_DIRECT straight
onto its disk (``/instant``, no page cache). The frozen image holds the disk's number at the
disk snapshot; the clone resumes from the captured RAM and counts on from the RAM's number.
Were the guest to run between the two - a resume sent before QEMU stopped it, saved its
CPUs and devices and write-protected its RAM - it would write further numbers to the
parent's overlay, which the frozen image never sees, and the clone would count on from
beyond the frozen disk's number. Since QEMU 9.0 kvmsnap sends that resume itself.

The counter resolves a shell loop's iteration (~40 ms under TCG); the guest also streams
4 KiB records into ``/stream`` (preallocated), each written O_DIRECT once the last completed
(~2 ms apiece): records written unseen in between go to the parent's overlay, and the
clone's copy of the file shows them as a run of zeros where the clone's own writes go on.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.disks.verify import read_file
from kvmsnap_plugin.host.images import raw_copy
from kvmsnap_plugin.model import BackupJob, ForkOptions
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu

#: QEMU's deprecation of ``fd:`` URIs on plain files (9.1 on)
FD_DEPRECATED = "fd: migration to a file is deprecated"
#: the records the guest's stream writes in all, and their size (init.sh)
STREAMED, RECORD = 20000, 4096


class FrozenInstant:
    """Reads the frozen image's ``/instant``, the clone's ``/stream`` and the clone's
    stderr while they exist."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.disk_count: int | None = None
        self.stream = b""
        self.clone_stderr = ""

    @hookimpl
    def kvmsnap_post_shutdown(self, fork, exposure):
        self.stream = read_file(exposure.disks[0].image, "/stream") or b""
        forked = fork.disks[0]
        raw = raw_copy(forked.frozen, self.scratch / "frozen.raw", forked.disk.format)
        try:
            self.disk_count = int((read_file(raw, "/instant") or b"0").split(b"\0")[0])
        finally:
            raw.unlink()
        stderr = fork.state_file.parent / "clone.stderr"  # the run's work directory
        self.clone_stderr = stderr.read_text(errors="replace") if stderr.exists() else ""


def streamed(stream: bytes) -> list[bytes]:
    """The records of ``/stream`` up to the last one written (it is preallocated: zeros)."""
    records = [stream[i:i + RECORD] for i in range(0, len(stream), RECORD)]
    while records and records[-1] == bytes(RECORD):
        records.pop()
    return records


def counted_on_from(console: str) -> int:
    """The first line number the clone's workload reached: its first whole ``KVMSNAP-COUNT
    n`` (the log may start mid-line), or, if the power button stopped it before it printed
    one, the line after its last (``KVMSNAP-WORKLOAD-STOPPED n``: it had printed n)."""
    count = re.search(r"^KVMSNAP-COUNT (\d+)\r?$", console, re.MULTILINE)
    if count:
        return int(count[1])
    return int(re.search(r"KVMSNAP-WORKLOAD-STOPPED (\d+)", console)[1]) + 1


@pytest.mark.parametrize("method", ["background-snapshot", "stop-and-copy"])
def test_the_clone_counts_on_from_where_the_frozen_disk_stopped(start_demo, tmp_path,
                                                                   qemu_build, method):
    vm = start_demo(binary=qemu_build.binary, instant=True, interval=0, disk_size_mib=128)
    vm.wait_counter(30)
    reader = FrozenInstant(tmp_path)
    job = BackupJob("demo", vm.paths.backup_qmp, ForkOptions(
        method=method, workdir=tmp_path / "work", clone_console=tmp_path / "clone.log"))
    result = backup(job, Hooks(plugin_manager([reader], entry_points=False)))
    assert result.clean and result.method == method
    assert reader.disk_count is not None and reader.disk_count >= 30
    # Paused before line n's disk write: disk n-1, the clone writes n first; after it,
    # before or after its console line: disk n, the clone prints n or n+1 first. A guest
    # that ran on in between is further ahead by every line it wrote meanwhile.
    clone_console = (tmp_path / "clone.log").read_text(errors="replace")
    ahead = counted_on_from(clone_console) - reader.disk_count
    assert 0 <= ahead <= 1, f"the clone's RAM is {ahead} lines ahead of the frozen disk"
    written = streamed(reader.stream)
    assert len(written) > 500  # it streamed before and after the fork...
    assert "KVMSNAP-UNMOUNTED" in clone_console and len(written) < STREAMED  # ...and at it
    lost = written.count(bytes(RECORD))
    assert lost == 0, f"{lost} records written between the disk and the RAM snapshot are lost"
    # The state file went to QEMU as file:/dev/fdset/N where it has file: URIs (10.0).
    assert FD_DEPRECATED not in vm.stderr_log.read_text(errors="replace")
    assert FD_DEPRECATED not in reader.clone_stderr
    assert vm.qmp.execute("query-fdsets") == []  # nothing of the fork's left in QEMU
