"""Named points where kvmsnap can be made to die at once, to prove it is crash-safe.

``KVMSNAP_FAULT=NAME`` makes the process SIGKILL itself when it reaches point NAME: no
cleanup, no finally blocks, exactly like a crash, an OOM kill or ``kill -9``. The tests use
it to show that ``kvmsnap recover`` then leaves the parent running on its original disk
chain, with nothing left behind and no write lost. Unset, a point costs one dict lookup.
"""

from __future__ import annotations

import os

from kvmsnap_plugin.host import process

POINTS = (
    "paused",  # the parent is stopped; no disk snapshot yet
    "disk-snapshot",  # the parent writes to its new overlays; RAM not saved yet
    "ram-save",  # the RAM snapshot is being written
    "clone-loading",  # the clone runs and is loading the RAM state
    "clone-shutdown",  # the clone's power button is pressed
    "archiving",  # the clone's disks are exposed and mounted; archivers run
    "commit",  # the parent's overlay is being committed back
)


def point(name: str) -> None:
    """Die at once here if ``KVMSNAP_FAULT`` names this point."""
    if os.environ.get("KVMSNAP_FAULT") == name:
        process.end(os.getpid(), soft=False)  # SIGKILL: not even a finally block runs
