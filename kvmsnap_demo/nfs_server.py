"""A private userspace NFS server for the tests: nfs-ganesha, NFSv3 and v4, on 127.0.0.1.

NFSv3 needs a portmapper: ganesha registers its NFSv3 and MOUNT programs with rpcbind at
start-up and exits when it cannot (Debian builds it with RPCBIND; no setting turns the
registration off). The host's rpcbind may not run, and the test must neither start one on
the host's port 111 nor write into a running one. So the test starts its own rpcbind in a
private network namespace (its port 111 is nobody's) and a private mount namespace with
its own /run (its /run/rpcbind.sock is nobody's); ganesha joins that mount namespace only
(it registers through the socket) and stays in the host's network, where QEMU's user-mode
network reaches it. Guests mount with fixed ports (``port=``, ``mountport=``,
``mountproto=tcp``, ``nolock``), so they never ask a portmapper either.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmsnap_plugin.host import process

GANESHA_CONF = """\
NFS_CORE_PARAM {{ Bind_Addr = 127.0.0.1; NFS_Port = {port}; MNT_Port = {mount_port};
                  Protocols = 3, 4; Mount_Path_Pseudo = true;
                  Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {root}/recovery; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {root}/export; Pseudo = /export; Access_Type = RW;
          Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; SecType = sys;
          FSAL {{ Name = VFS; }} }}
"""
#: rpcbind with a /run of its own (a tmpfs in its private mount namespace)
PRIVATE_RPCBIND = 'mount -t tmpfs kvmsnap-rpcbind /run && exec "$0" -f'


@dataclass(frozen=True)
class NfsServer:
    root: Path
    port: int  # NFS (v3 and v4)
    mount_port: int  # NFSv3's MOUNT protocol

    @property
    def export(self) -> Path:
        """The exported directory: guests mount HOST:/export/NAME for its NAME."""
        return self.root / "export"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nfs-ganesha does not listen on port {port}")


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@contextlib.contextmanager
def nfs_server(root: Path) -> Iterator[NfsServer]:
    """nfs-ganesha exporting ``root/export`` over NFSv3 and v4, its rpcbind private;
    both stopped (ganesha first: it unregisters) when the block ends."""
    server = NfsServer(root, free_port(), free_port())
    for sub in ("export", "recovery"):
        (root / sub).mkdir()
    (root / "ganesha.conf").write_text(GANESHA_CONF.format(
        port=server.port, mount_port=server.mount_port, root=root))
    rpcbind = process.spawn([
        "unshare", "--mount", "--propagation", "private", "--net", "--",
        "/bin/sh", "-c", PRIVATE_RPCBIND, process.find_program("rpcbind", "rpcbind")])
    try:
        # the socket as rpcbind's mount namespace sees it
        _wait_for(Path(f"/proc/{rpcbind.pid}/root/run/rpcbind.sock"), 30)
        # nsenter's mount namespace starts at its root: every path absolute
        ganesha = process.spawn([
            "nsenter", f"--target={rpcbind.pid}", "--mount", "--",
            process.find_program("ganesha.nfsd", "nfs-ganesha"), "-F",
            "-f", root / "ganesha.conf", "-L", root / "ganesha.log",
            "-p", root / "ganesha.pid", "-N", "NIV_EVENT"])
        try:
            wait_listening(server.port, 60)
            wait_listening(server.mount_port, 10)
            yield server
        finally:
            process.end(ganesha, grace=10)
    finally:
        process.end(rpcbind, grace=10)
