"""The bare-QEMU backend's commit jobs: a commit that does not end with every byte in the
frozen image raises, so the overlay that still holds the writes is never deleted."""

from __future__ import annotations

import pytest
from test_fork_engine import planned_in

from kvmsnap_plugin.backends.qmp import QmpBackend, commit_job
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.vm.qmp import Event


class JobMonitor:
    """QEMU's answers to a commit job that ends with ``events``, in order."""

    def __init__(self, *events: tuple[str, dict]) -> None:
        self.events = list(events)
        self.commands: list[str] = []

    def execute(self, command, arguments=None, *, timeout=None):
        self.commands.append(command)
        return [] if command == "query-block-jobs" else {}

    def wait_event(self, names, timeout, match=lambda e: True):
        name, data = self.events.pop(0)
        assert name in names
        return Event(name, data, 0.0)


def backend_with(tmp_path, monitor) -> QmpBackend:
    backend = QmpBackend(tmp_path / "unused.qmp", pid=1, running=False)
    backend.monitor.close()
    backend.monitor = monitor
    return backend


def test_an_active_commit_pivots_once_ready_and_reports_its_bytes(tmp_path):
    disk = planned_in(tmp_path, 1)[0]
    job = commit_job(disk)
    monitor = JobMonitor(("BLOCK_JOB_READY", {"device": job}),
                         ("BLOCK_JOB_COMPLETED", {"device": job, "len": 4096}))
    assert backend_with(tmp_path, monitor).commit_one(disk, 60) == 4096
    assert monitor.commands == ["query-block-jobs", "block-commit", "block-job-complete"]


@pytest.mark.parametrize("ending", [("BLOCK_JOB_CANCELLED", {}),
                                    ("BLOCK_JOB_COMPLETED", {"error": "No space left"})])
@pytest.mark.parametrize("below", [False, True])
def test_a_commit_cancelled_by_anyone_or_failed_raises(tmp_path, ending, below):
    disk = planned_in(tmp_path, 1)[0]
    monitor = JobMonitor((ending[0], {"device": commit_job(disk), **ending[1]}))
    backend = backend_with(tmp_path, monitor)
    with pytest.raises(VMError, match="its overlay is kept"):
        if below:
            backend.commit_below(disk, "top-node-of-vda", 60)
        else:
            backend.commit_one(disk, 60)
