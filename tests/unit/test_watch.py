"""The watch over the parent during the long steps: real threads, a real signal."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from kvmsnap_plugin.errors import HostError
from kvmsnap_plugin.run.watch import watching


class Parent:
    def __init__(self, fails_after: float | None) -> None:
        self.fails_at = None if fails_after is None else time.monotonic() + fails_after
        self.checks = 0

    def check_healthy(self) -> None:
        self.checks += 1
        if self.fails_at is not None and time.monotonic() >= self.fails_at:
            raise HostError("web stopped on an I/O error during the backup: no space left")


def test_a_parent_that_stops_ends_a_blocking_step_at_once():
    """A child process that would run for a minute (like a quiet borg) is interrupted within
    a check or two, and the step ends with the parent's error, not KeyboardInterrupt."""
    started = time.monotonic()
    with pytest.raises(HostError, match="stopped on an I/O error"), \
            watching(Parent(fails_after=0.3), every=0.1):
        subprocess.run(["sleep", "60"], check=False)
    assert time.monotonic() - started < 5


def test_a_healthy_parent_is_checked_and_the_step_runs_to_its_end():
    parent = Parent(fails_after=None)
    with watching(parent, every=0.05):
        time.sleep(0.4)
    assert parent.checks >= 3


def test_an_offline_backup_has_nothing_to_watch():
    with watching(None):
        pass


def test_an_error_of_the_step_itself_is_not_hidden():
    with pytest.raises(ValueError), watching(Parent(fails_after=None), every=0.05):
        raise ValueError("the archiver failed")


def test_a_kvmsnap_started_with_sigint_ignored_is_still_interrupted():
    """A background job of a non-interactive shell (``kvmsnap backup &`` in a script)
    starts with SIGINT ignored: the watch's SIGINT must still end the step, and SIGINT is
    ignored again afterwards."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.monotonic()
        with pytest.raises(HostError, match="stopped on an I/O error"), \
                watching(Parent(fails_after=0.3), every=0.1):
            time.sleep(30)
        assert time.monotonic() - started < 5
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
