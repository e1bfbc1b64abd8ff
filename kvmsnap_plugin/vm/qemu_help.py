"""The options of the QEMU binary a parent runs, read from that very binary.

``/proc/PID/exe`` is the file the process was started from, also after a package upgrade
replaced it on disk; its ``-help`` says which options exist and which take a value. A
binary is asked once per process of kvmsnap (cached on its device, inode, size and
mtime). Without an answer (not root, not a QEMU) the caller falls back to QEMU 7.2's
list in :mod:`kvmsnap_plugin.vm.qemu_args`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import QemuOptions
from kvmsnap_plugin.vm.qemu_args import parse_help

log = logging.getLogger(__name__)

HELP_TIMEOUT = 30.0
_CACHE: dict[tuple[int, int, int, int], QemuOptions] = {}


def parent_options(pid: int) -> QemuOptions | None:
    """The options of the binary QEMU process ``pid`` runs, or None (then: QEMU 7.2's)."""
    exe = f"/proc/{pid}/exe"
    try:
        target = os.readlink(exe)
    except OSError as exc:
        log.warning("cannot read the binary of QEMU process %s (%s): assuming QEMU 7.2's "
                    "options", pid, exc.strerror)
        return None
    # Only ever a QEMU: this runs the binary as root.
    if "qemu" not in Path(target.removesuffix(" (deleted)")).name:
        log.warning("process %s runs %s, not a QEMU: assuming QEMU 7.2's options", pid,
                    target)
        return None
    return binary_options(exe)


def binary_options(binary: str) -> QemuOptions | None:
    """The options ``binary -help`` lists, or None if it gives no usable answer."""
    try:
        stat = os.stat(binary)
    except OSError as exc:
        log.warning("cannot stat %s: %s", binary, exc.strerror)
        return None
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        try:
            text = process.run([binary, "-help"], timeout=HELP_TIMEOUT, env=process.CLEAN_ENV,
                               inherit_env=False).stdout
        except KvmsnapError as exc:
            log.warning("%s -help failed (%s): assuming QEMU 7.2's options", binary, exc)
            return None
        options = parse_help(text)
        if "machine" not in options.with_value:
            log.warning("%s -help lists no -machine: not a QEMU system emulator's help; "
                        "assuming QEMU 7.2's options", binary)
            return None
        _CACHE[key] = options
    return _CACHE[key]
