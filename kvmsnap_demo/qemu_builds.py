"""The QEMU builds the tests and benchmarks run side by side: the system's and QEMU 10.

Debian 12's QEMU is 7.2; most hosts run newer ones. QEMU 10.0 from bookworm-backports is
unpacked (``apt-get download`` with a private apt list and cache, ``dpkg-deb -x``) into
``cache_root()/qemu-10``, never installed: the system QEMU stays 7.2 for everything else.
A wrapper runs it with its own modules (``QEMU_MODULE_DIR``: 7.2's would abort it) and its
own firmware (``-L``), and ``exec``s it, so ``/proc/PID/exe`` of the VM is the prefix's
binary: kvmsnap's clone runs that, with the same QEMU_MODULE_DIR (vm/confine.py keeps it
because the prefix is root-owned and no one else may write it).

qemu-img and qemu-storage-daemon stay the system's (7.2): the images are plain qcow2.

The stamp is written last, once the wrapper says it is 10.0 and has loaded its firmware:
an interrupted download is redone from scratch, a finished one is never downloaded again.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_demo.cache import cache_lock
from kvmsnap_plugin.errors import HostError, KvmsnapError
from kvmsnap_plugin.host import process
from kvmsnap_plugin.host.doctor import ask_qemu
from kvmsnap_plugin.host.probes import QEMU
from kvmsnap_plugin.paths import cache_root

log = logging.getLogger(__name__)

SYSTEM = "7.2"
QEMU10 = "10.0"
BUILDS = (SYSTEM, QEMU10)
SUITE = "bookworm-backports"
SOURCE = ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
          f"http://deb.debian.org/debian {SUITE} main")
#: what QEMU 10's qemu-system-x86_64 needs beside it (seabios: the backports one is required)
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils",
            "qemu-block-extra", "qemu-system-gui", "qemu-system-modules-opengl",
            "qemu-system-modules-spice", "seabios")
MODULES = Path("usr/lib/x86_64-linux-gnu/qemu")
MAKE_HINT = "`make test` (or `python -m kvmsnap_demo qemu10`) provisions it"


@dataclass(frozen=True)
class QemuBuild:
    """One QEMU the matrix runs: its name ("7.2", "10.0") and the binary to start VMs with."""

    name: str
    binary: str
    version: str  # what ``binary --version`` says, e.g. "10.0.2"


def prefix() -> Path:
    return cache_root() / "qemu-10"


def stamp(root: Path | None = None) -> Path:
    return (root or prefix()) / ".kvmsnap-complete"


def wrapper(root: Path | None = None) -> Path:
    return (root or prefix()) / "kvmsnap-bin" / QEMU


def qemu_build(name: str) -> QemuBuild:
    """The build called ``name``; HostError (never a skip) when it is not provisioned."""
    if name == SYSTEM:
        binary = process.find_program(QEMU, "qemu-system-x86")
    elif name == QEMU10:
        if not stamp().exists():
            raise HostError(f"QEMU {QEMU10} is not provisioned in {prefix()}", MAKE_HINT)
        binary = str(wrapper())
    else:
        raise HostError(f"unknown QEMU build {name!r}", f"one of {', '.join(BUILDS)}")
    version = version_of(binary)
    if not version.startswith(f"{name}."):
        raise HostError(f"{binary} is QEMU {version}, not {name}",
                        f"install Debian 12's QEMU {SYSTEM}" if name == SYSTEM else MAKE_HINT)
    return QemuBuild(name, binary, version)


def version_of(binary: str) -> str:
    out = process.run([binary, "--version"], timeout=30).stdout
    match = re.search(r"version (\d+\.\d+\.\d+)", out)
    return match[1] if match else "unknown"


def provision_qemu10() -> QemuBuild:
    """QEMU 10 in its private prefix, downloaded and unpacked unless it already is."""
    root = prefix()
    root.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(root.parent / ".qemu-10.lock"):
        if stamp(root).exists():
            log.info("QEMU %s already provisioned in %s", QEMU10, root)
            return qemu_build(QEMU10)
        shutil.rmtree(root, ignore_errors=True)  # what an interrupted run left
        root.mkdir(mode=0o755)
        os.chmod(root, 0o755)  # whatever the umask: the clone trusts only root-only dirs
        debs = _download(root / "apt")
        log.info("unpacking %d packages into %s", len(debs), root)
        for deb in debs:
            process.run(["dpkg-deb", "-x", deb, root], timeout=300)
        shutil.rmtree(root / "apt")
        _write_wrapper(root)
        build = _smoke_test(root)
        stamp(root).write_text(f"{build.version}\n")
        log.info("QEMU %s ready: %s", build.version, build.binary)
        return build


def _download(apt_dir: Path) -> list[Path]:
    """The backports .debs, through a private apt list and cache (no system source added)."""
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(SOURCE + "\n")
    options = ["-q", "-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
               "-o", "Dir::Etc::SourceParts=/nonexistent",
               "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
               "-o", f"Dir::Cache={apt_dir / 'cache'}",
               "-o", "APT::Sandbox::User=root",  # the private dirs are root's alone
               "-o", "APT::Update::Error-Mode=any"]  # a failed fetch is an error
    try:
        log.info("downloading the package list of %s", SUITE)
        process.run(["apt-get", *options, "update"], timeout=300)
        log.info("downloading QEMU %s: %s", QEMU10, " ".join(PACKAGES))
        process.run(["apt-get", *options, "download", *(f"{p}/{SUITE}" for p in PACKAGES)],
                    timeout=900, cwd=apt_dir / "debs")
    except KvmsnapError as exc:
        errors = [line for line in getattr(exc, "stderr", "").splitlines()
                  if line.startswith("E:")]
        detail = errors[0].removeprefix("E:").strip() if errors else str(exc)
        raise HostError(f"could not download QEMU {QEMU10} from {SUITE}: {detail}",
                        "check the network (deb.debian.org) and run `make test` again") from exc
    return sorted((apt_dir / "debs").glob("*.deb"))


def _write_wrapper(root: Path) -> None:
    usr = root / "usr"
    script = (
        "#!/bin/sh\n"
        f"# QEMU {QEMU10} from {SUITE}, unpacked beside the system's (kvmsnap tests).\n"
        "# Its own modules (the system's would abort it) and firmware; exec, so that\n"
        "# /proc/PID/exe is the real binary (kvmsnap's clone runs that).\n"
        f"QEMU_MODULE_DIR={shlex.quote(str(root / MODULES))}\n"
        "export QEMU_MODULE_DIR\n"
        f"exec {shlex.quote(str(usr / 'bin' / QEMU))} "
        f"-L {shlex.quote(str(usr / 'share/qemu'))} "
        f"-L {shlex.quote(str(usr / 'share/seabios'))} \"$@\"\n")
    path = wrapper(root)
    path.parent.mkdir(mode=0o755)
    path.write_text(script)
    path.chmod(0o755)


def _smoke_test(root: Path) -> QemuBuild:
    """The wrapper is QEMU 10 and builds a PC with its firmware, or no stamp is written."""
    binary = str(wrapper(root))
    version = version_of(binary)
    if not version.startswith(f"{QEMU10}."):
        raise HostError(f"{SUITE} gave QEMU {version}, not {QEMU10}",
                        "update kvmsnap_demo/qemu_builds.py for the new backports version")
    answer = ask_qemu(binary, ["query-version"], machine="pc")
    if not answer or "return" not in answer[0]:
        raise HostError(f"QEMU {version} in {root} does not start: {answer}",
                        f"remove {root} and run `make test` again")
    return QemuBuild(QEMU10, binary, version)
