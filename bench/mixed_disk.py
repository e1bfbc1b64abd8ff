"""P2's guest disk: an ext4 with realistic mixed data, built host-side once and cached.

The recipe, for a 2 GiB disk (scaled linearly for other sizes; ``--quick`` uses 512 MiB):

- ~300 MiB of text: licences, documentation, C headers, Perl and Python sources, locale
  data (files whose first 8 KiB hold no NUL byte), from the host's /usr;
- ~300 MiB of binaries: executables and shared libraries from /usr/bin, /usr/sbin,
  /usr/libexec and /usr/lib;
- ~200 MiB of random data (a seeded generator; files of 1-16 MiB);
- ~100 MiB of zero-filled files (written, not sparse: ext4 allocates their blocks);
- the rest free space (never written: reads as zeros).

The raw file is formatted with mkfs.ext4, loop-mounted to be filled (unmounted and detached
in ``finally``), then converted to qcow2 (``qemu-img convert`` drops the zero clusters).
The image lands in ``~/.cache/kvmsnap/bench/`` with a manifest of what went in (counts and
bytes per kind); runs boot copies of it, never the cached file itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import MIB, progress
from kvmsnap_plugin.paths import cache_root

RECIPE_VERSION = 1
#: MiB of each kind for a 2048 MiB disk
PER_2GIB = {"text": 300, "binary": 300, "random": 200, "zeros": 100}
TEXT_SOURCES = ("/usr/share/common-licenses", "/usr/share/doc", "/usr/include",
                "/usr/share/perl", "/usr/share/perl5", "/usr/lib/python3",
                "/usr/share/i18n", "/usr/share")
BINARY_SOURCES = ("/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib")
MAX_FILE = 64 * MIB  # skip anything larger (one huge library would be most of the budget)
SEED = 20261126


def cached_disk(size_mib: int, cache: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached qcow2 of ``size_mib`` and its manifest, built if missing."""
    cache = cache or cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    image = cache / f"p2-mixed-{size_mib}M-v{RECIPE_VERSION}.qcow2"
    manifest_path = image.with_suffix(".json")
    if image.exists() and manifest_path.exists():
        return image, json.loads(manifest_path.read_text())
    progress(f"P2: building the {size_mib} MiB mixed-data disk (once; cached in {cache})")
    with tempfile.TemporaryDirectory(prefix="p2-disk-", dir=cache) as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as handle:
            handle.truncate(size_mib * MIB)
        _run(["mkfs.ext4", "-q", "-F", "-L", "p2data", "-E",
              "lazy_itable_init=0,lazy_journal_init=0", str(raw)])
        mountpoint = Path(tmp) / "mnt"
        mountpoint.mkdir()
        with loop_mounted(raw, mountpoint, read_only=False):
            manifest = fill(mountpoint, size_mib)
            usage = shutil.disk_usage(mountpoint)
            manifest["fs_used_mib"] = round(usage.used / MIB, 1)
            manifest["fs_free_mib"] = round(usage.free / MIB, 1)
        partial = Path(tmp) / "disk.qcow2"
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(partial)])
        manifest.update(size_mib=size_mib, recipe_version=RECIPE_VERSION,
                        qcow2_bytes=partial.stat().st_size)
        partial.rename(image)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    progress(f"P2: disk built: {describe(manifest)}")
    return image, manifest


def describe(manifest: dict[str, Any]) -> str:
    kinds = manifest.get("kinds", {})
    parts = [f"{kind} {info['bytes'] / MIB:.0f} MiB ({info['files']} files)"
             for kind, info in kinds.items()]
    return (f"{manifest.get('size_mib')} MiB ext4: " + ", ".join(parts)
            + f"; {manifest.get('fs_free_mib', 0):.0f} MiB free")


def fill(root: Path, size_mib: int) -> dict[str, Any]:
    scale = size_mib / 2048
    budgets = {kind: int(mib * scale * MIB) for kind, mib in PER_2GIB.items()}
    kinds = {"text": _copy_tree_files(root / "text", TEXT_SOURCES, budgets["text"], _is_text),
             "binary": _copy_tree_files(root / "bin", BINARY_SOURCES, budgets["binary"],
                                        _is_binary),
             "random": _random_files(root / "random", budgets["random"]),
             "zeros": _zero_files(root / "zeros", budgets["zeros"])}
    os.sync()
    return {"kinds": kinds, "budgets_mib": {k: round(v / MIB) for k, v in budgets.items()}}


def _candidates(sources: tuple[str, ...]) -> Iterator[Path]:
    seen: set[tuple[int, int]] = set()
    for source in sources:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if not path.is_file() or path.is_symlink() or not 0 < st.st_size <= MAX_FILE:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                yield path


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(8192)
    except OSError:
        return b""


def _is_text(path: Path) -> bool:
    if path.suffix in (".gz", ".xz", ".bz2", ".zst", ".pyc", ".png", ".jpg", ".gif", ".pdf"):
        return False
    head = _head(path)
    return bool(head) and b"\0" not in head


def _is_binary(path: Path) -> bool:
    return _head(path)[:4] == b"\x7fELF"


def _copy_tree_files(dest: Path, sources: tuple[str, ...], budget: int,
                     accept: Any) -> dict[str, int]:
    copied = files = 0
    for path in _candidates(sources):
        if copied >= budget:
            break
        size = path.stat().st_size
        if copied + size > budget * 1.02 or not accept(path):
            continue
        target = dest / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(path, target)
        except OSError:
            continue
        copied += size
        files += 1
    return {"bytes": copied, "files": files}


def _random_files(dest: Path, budget: int) -> dict[str, int]:
    rng = random.Random(SEED)
    dest.mkdir(parents=True)
    written = files = 0
    while written < budget:
        size = min(budget - written, rng.randint(1, 16) * MIB)
        (dest / f"blob{files:03d}.bin").write_bytes(rng.randbytes(size))
        written += size
        files += 1
    return {"bytes": written, "files": files}


def _zero_files(dest: Path, budget: int) -> dict[str, int]:
    dest.mkdir(parents=True)
    zeros = bytes(MIB)
    written = files = 0
    while written < budget:  # preallocated-looking files: 25 MiB each
        size = min(budget - written, 25 * MIB)
        with open(dest / f"prealloc{files:02d}.img", "wb") as handle:
            for _ in range(size // MIB):
                handle.write(zeros)
            handle.write(bytes(size % MIB))
        written += size
        files += 1
    return {"bytes": written, "files": files}


# -- loop devices ---------------------------------------------------------------------------
@contextlib.contextmanager
def loop_mounted(raw: Path, mountpoint: Path, read_only: bool = True) -> Iterator[Path]:
    """``raw`` (an ext4 image) mounted at ``mountpoint``; unmounted and detached always.

    Read-only mounts skip journal replay (``noload``), as kvmsnap's own exposure does, so
    a crash-consistent copy mounts without being changed."""
    argv = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else []) + [str(raw)]
    device = _run(argv).strip()
    try:
        options = "ro,noload" if read_only else "rw"
        _run(["mount", "-t", "ext4", "-o", options, device, str(mountpoint)])
        try:
            yield mountpoint
        finally:
            _unmount(mountpoint)
    finally:
        _run(["losetup", "--detach", device], check=False)


def _unmount(mountpoint: Path) -> None:
    for _ in range(5):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        subprocess.run(["sync"], check=False)
        time.sleep(0.5)
    # last resort: detach lazily so that the loop device can go
    subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True, check=False)


def _run(argv: list[str], check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    return done.stdout
