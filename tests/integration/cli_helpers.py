"""What integration tests share: running the `kvmsnap` command, reading its one-line errors,
finding a clone, and a small tmpfs (import with ``from cli_helpers import ...``)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from kvmsnap_plugin.host import process


def kvmsnap(*args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """The `kvmsnap` command, as a user runs it (its own process, our environment + env)."""
    return subprocess.run([sys.executable, "-m", "kvmsnap_plugin.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one error line naming its fix, no traceback; the line."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvmsnap: error:")]
    assert len(errors) == 1, done.stderr
    assert re.search(r"\(fix: .+\)$", errors[0]), errors[0]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def clone_pid(workdir: Path) -> int | None:
    """The running clone whose files are in ``workdir`` (it loads with -incoming)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "-incoming" in text and str(workdir) in text:
            return int(cmdline.parent.name)
    return None


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``mountpoint``, unmounted (lazily if busy) on exit."""
    mountpoint.mkdir()
    process.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "kvmsnap-test", mountpoint],
                timeout=30)
    try:
        yield mountpoint
    finally:
        process.run(["umount", "-l", mountpoint], timeout=30)
