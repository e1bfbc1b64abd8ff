"""The clone's network filesystems: found and lazily force-detached before the power button.

The clone's network is cut (its NICs unplugged, its user-mode network restricted), so a
guest with NFS or CIFS mounts meets a server that never answers while it shuts down: a
hard NFS mount with unwritten data blocks its unmount, and the writers' exits, for as
long as the server stays silent, so kvmsnap's ladder ends up stopping the clone hard and
the local disks are archived crash-consistent. Through the clone's own guest agent each
network mount is detached first (``umount -l -f``: forced, so requests waiting on the
server fail at once; lazy, so it leaves the namespace even while busy); what the clone
had not yet written to the share is dropped, which is right, since the clone must never
write to the live share: the parent does, and goes on doing so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.model import NetworkMount
from kvmsnap_plugin.vm.guest_agent import GuestAgent

log = logging.getLogger(__name__)

#: filesystem types (as /proc/mounts names them) served over the network
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
    "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "afs", "ncpfs", "lustre", "davfs",
    "fuse.davfs"})
DETACHED = "detached"
LEFT = "left to the guest"
#: how long one umount may take in the guest; a lazy, forced one does not wait for the
#: server, only a path lookup on a dead mount could (``-c`` avoids that)
UMOUNT_TIMEOUT = 10.0


def parse_mounts(text: str) -> list[NetworkMount]:
    """The network filesystems in a /proc/mounts text, in mount order."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in NETWORK_FS_TYPES:
            found.append(NetworkMount(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                                      fields[3], outcome=LEFT))
    return found


def detach_network_mounts(agent_socket: Path | None, detach: bool,
                          budget: float) -> tuple[NetworkMount, ...]:
    """Find the clone's network mounts through its agent and (``detach``) detach them.

    Never raises: a clone without an agent, or one that does not answer, keeps its mounts
    and the ladder goes on (the report then lists none: they could not be seen)."""
    if agent_socket is None:
        return ()
    deadline = time.monotonic() + budget
    try:
        with GuestAgent(agent_socket, timeout=min(5.0, budget)) as agent:
            mounts = _network_mounts(agent, deadline)
            if detach:
                # deepest first: a share mounted inside another leaves before its parent
                for mount in sorted(mounts, key=lambda m: -m.mountpoint.count("/")):
                    mounts[mounts.index(mount)] = _detach(agent, mount, deadline)
    except VMError as exc:
        log.warning("could not look for network filesystems in the clone: %s", exc)
        return ()
    for mount in mounts:
        log.info("clone network filesystem %s on %s (%s): %s", mount.source,
                 mount.mountpoint, mount.fstype, mount.outcome)
    return tuple(mounts)


def _network_mounts(agent: GuestAgent, deadline: float) -> list[NetworkMount]:
    # cat, not guest-file-read: one call, and /proc/mounts never blocks on a dead server
    code, out, err = agent.run(["cat", "/proc/mounts"], _left(deadline))
    if code != 0:
        raise VMError(f"cat /proc/mounts in the clone: {err.strip() or code}")
    return parse_mounts(out)


def _detach(agent: GuestAgent, mount: NetworkMount, deadline: float) -> NetworkMount:
    # -i: no umount.nfs helper (it would talk to the server); -c: no path lookup
    code, _, err = agent.run(["umount", "-i", "-c", "-l", "-f", mount.mountpoint],
                             min(UMOUNT_TIMEOUT, _left(deadline)))
    if code == 0:
        outcome = DETACHED
    elif code is None:
        outcome = "umount did not return in time; left to the guest"
    else:
        outcome = f"umount failed ({err.strip() or code}); left to the guest"
    return NetworkMount(mount.source, mount.mountpoint, mount.fstype, mount.options, outcome)


def _left(deadline: float) -> float:
    return max(0.5, deadline - time.monotonic())


def _unescape(field: str) -> str:
    r"""/proc/mounts writes space, tab, newline and backslash as octal (``\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
