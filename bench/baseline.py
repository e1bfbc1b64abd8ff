"""P2's baselines: plain ``borg create`` / ``restic backup`` of an offline raw copy, and the
repositories both sides archive into.

The commands match what kvmsnap's archivers run (kvmsnap_plugin/archivers/), minus tags:

- borg, files: ``borg create --json --numeric-ids --compression lz4 REPO::NAME vdisk0``, run
  in the directory holding the loop-mounted copy (as kvmsnap runs it in its mount root);
- borg, image: the same with ``--chunker-params fixed,4194304`` of ``disk.raw``;
- restic, files: ``restic -r REPO backup --json --host baseline vdisk0``;
- restic, image: ``restic -r REPO backup --json --host baseline --stdin --stdin-filename
  disk.raw`` with the raw file as its stdin.

Secrets and caches come from the environment (:func:`tool_env` sets them for the run):
BORG_PASSPHRASE, RESTIC_PASSWORD, and private BORG_BASE_DIR / RESTIC_CACHE_DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmsnap_plugin.host import process

BORG_IMAGE_CHUNKER = "fixed,4194304"  # kvmsnap's borg image mode (archivers/borg.py)
TIMEOUT = 3600


def borg_program() -> str:
    venv = Path(sys.executable).parent / "borg"
    return str(venv) if venv.exists() else "borg"


@contextlib.contextmanager
def tool_env(base: Path) -> Iterator[None]:
    """Passphrases (fresh, random, never printed) and private cache directories, in
    ``os.environ`` for kvmsnap's archivers and the baselines alike; restored on exit."""
    values = {"BORG_PASSPHRASE": secrets.token_hex(16),
              "RESTIC_PASSWORD": secrets.token_hex(16),
              "BORG_BASE_DIR": str(base / "borg-base"),
              "RESTIC_CACHE_DIR": str(base / "restic-cache"),
              "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    with process.environment(values, unset=("RESTIC_PASSWORD_FILE",
                                            "RESTIC_PASSWORD_COMMAND", "BORG_PASSCOMMAND")):
        yield


def init_repo(tool: str, repo: Path) -> None:
    if tool == "borg":
        run_command([borg_program(), "init", "--encryption=repokey", str(repo)])
    else:
        run_command(["restic", "init", "-r", str(repo)])


def archive(tool: str, mode: str, repo: Path, source_dir: Path, name: str,
            raw: Path | None = None) -> dict[str, Any]:
    """One plain archive run; returns seconds (the command alone), bytes read and stored.

    files: ``source_dir`` holds the mounted tree ``vdisk0``; image: ``raw`` is the disk."""
    if tool == "borg":
        extra = ["--chunker-params", BORG_IMAGE_CHUNKER] if mode == "image" else []
        if mode == "image":
            assert raw is not None
            cwd, paths = raw.parent, [raw.name]
        else:
            cwd, paths = source_dir, ["vdisk0"]
        argv = [borg_program(), "create", "--json", "--numeric-ids", "--compression", "lz4",
                *extra, f"{repo}::{name}", *paths]
        started = time.monotonic()
        out = run_command(argv, cwd=cwd, ok_codes=(0, 1))
        seconds = time.monotonic() - started
        stats = json.loads(out or "{}").get("archive", {}).get("stats", {})
        return {"seconds": seconds, "bytes": int(stats.get("original_size", 0)),
                "stored_bytes": stats.get("deduplicated_size")}
    argv = ["restic", "-r", str(repo), "backup", "--json", "--host", "baseline",
            "--tag", name]
    if mode == "image":
        assert raw is not None
        with open(raw, "rb") as stdin:
            started = time.monotonic()
            out = run_command([*argv, "--stdin", "--stdin-filename", "disk.raw"], stdin=stdin)
            seconds = time.monotonic() - started
    else:
        started = time.monotonic()
        out = run_command([*argv, "vdisk0"], cwd=source_dir)
        seconds = time.monotonic() - started
    summary = restic_summary(out)
    return {"seconds": seconds, "bytes": int(summary.get("total_bytes_processed", 0)),
            "stored_bytes": summary.get("data_added")}


def restic_summary(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        with contextlib.suppress(ValueError):
            message = json.loads(line)
            if isinstance(message, dict) and message.get("message_type") == "summary":
                return message
    return {}


def repo_bytes(repo: Path) -> int:
    """Bytes the repository occupies on disk (its files' sizes)."""
    total = 0
    for dirpath, _, filenames in os.walk(repo):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).stat().st_size
    return total


def run_command(argv: list[str], cwd: Path | None = None, stdin: Any = None,
         ok_codes: tuple[int, ...] = (0,)) -> str:
    env = dict(os.environ, LC_ALL="C.UTF-8")
    done = subprocess.run(argv, cwd=cwd, stdin=stdin if stdin is not None
                          else subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)
    if done.returncode not in ok_codes:
        what = f"{Path(argv[0]).name} {' '.join(argv[1:4])}"
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout
