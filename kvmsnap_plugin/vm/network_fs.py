"""The clone's network filesystems: found, and forced off, before the power button.

The clone's network is cut (its NICs unplugged, its user-mode network restricted: slirp
drops a restricted guest's packets silently, it does not refuse the connection), so a guest
with NFS or CIFS mounts meets a server that never answers while it shuts down. Measured
(Debian 12, NFSv4 or v3, hard or soft mount, a writer holding unwritten lines): the
writer's exit blocks uninterruptibly flushing to the silent server, systemd gives up its
unit and the unmount, and kvmsnap's ladder ends up stopping the clone hard: the local
disks are then archived crash-consistent. A lazy unmount alone does not help: the
writer's flush still waits.

So, through the clone's own guest agent, a small loop starts in the guest (outside the
agent's cgroup, with no shutdown dependencies, so it lives on while systemd stops
everything): every half second it force-unmounts each network mount (``umount -f``: the
requests waiting on the server fail at once, their unwritten data is dropped) until the
mount is gone or its time is up (then ``umount -l -f``). The writers' flushes fail instead of
hanging, systemd's own unmounts go through, and the guest powers off. Dropping what the
clone had not written to the share is right: the clone must never write to the live share,
the parent does and goes on doing so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kvmsnap_plugin.errors import StepTimeout, VMError
from kvmsnap_plugin.model import NetworkMount
from kvmsnap_plugin.vm.guest_agent import GuestAgent

log = logging.getLogger(__name__)

#: filesystem types (as /proc/mounts names them) served over the network
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
    "fuse.sshfs", "fuse.rclone", "fuse.s3fs", "afs", "ncpfs", "lustre", "davfs",
    "fuse.davfs"})
FORCED = "forced off (what the clone had not written to it is dropped)"
LEFT = "left to the guest"
#: the loop, run by ``/bin/sh FILE LIMIT MOUNTPOINT...`` (mount points as /proc/mounts
#: escapes them). -i: no umount.nfs helper (it would talk to the server); -c: no path
#: lookup, which would wait on the dead server too; in the background, since the umount
#: that takes a mount away last tears the client down and waits on the server itself
#: (NFSv4 ends its session): that one, and any other umount still naming a mount already
#: gone, is killed (the wait is killable), instead of holding systemd's final stage up
#: for its whole timeout. Its umount helpers too (umount.nfs4...: systemd's own unmount
#: runs one, which took the last of several NFSv4 mounts away and held the final stage
#: 20 s). Only umount processes' command lines are read (by their comm): reading
#: another's may wait on its memory, and a fork per process is slow under TCG.
RELEASE_LOOP = r"""trap '' TERM HUP  # systemd's last stage: the loop ends itself, soon
end=$(( $(date +%s) + $1 )); shift
grace=10  # rounds of killing stuck umounts once every mount is gone
while [ "$(date +%s)" -lt "$end" ]; do
    mounted=0; stuck=0
    for m in "$@"; do
        mp=$(printf '%b' "$m")
        if grep -qF " $m " /proc/mounts; then
            mounted=1; umount -i -c -f "$mp" </dev/null >/dev/null 2>&1 &
            continue
        fi
        for p in /proc/[0-9]*; do
            { read -r comm < "$p/comm"; } 2>/dev/null || continue
            case "$comm" in umount|umount.*) ;; *) continue ;; esac
            case " $(tr '\0' ' ' 2>/dev/null < "$p/cmdline")" in
            *umount*" $mp "*) stuck=1; kill -9 "${p#/proc/}" 2>/dev/null ;;
            esac
        done
    done
    if [ "$mounted" = 0 ]; then
        grace=$((grace - 1))
        if [ "$stuck" = 0 ] || [ "$grace" -le 0 ]; then exit 0; fi
    fi
    sleep 0.5
done
for m in "$@"; do umount -i -c -l -f "$(printf '%b' "$m")"; done
"""
#: writes the loop to a file and starts it: as a transient systemd service with no
#: dependencies where systemd runs (so stopping the agent does not end it), else in the
#: background
LAUNCH = r"""printf '%s' "$1" > /run/kvmsnap-netfs-release && shift || exit 1
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null; then
    exec systemd-run --quiet --collect --unit=kvmsnap-netfs-release \
        -p DefaultDependencies=no /bin/sh /run/kvmsnap-netfs-release "$@"
fi
/bin/sh /run/kvmsnap-netfs-release "$@" </dev/null >/dev/null 2>&1 &
"""


def parse_mounts(text: str) -> list[NetworkMount]:
    """The network filesystems in a /proc/mounts text, in mount order."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in NETWORK_FS_TYPES:
            found.append(NetworkMount(_unescape(fields[0]), _unescape(fields[1]), fields[2],
                                      fields[3], outcome=LEFT))
    return found


def detach_network_mounts(agent_socket: Path | None, detach: bool, budget: float,
                          release_for: float = 300.0) -> tuple[NetworkMount, ...]:
    """Find the clone's network mounts through its agent and (``detach``) start forcing
    them off, for ``release_for`` seconds at most (the clone's whole shutdown).

    Never raises: a clone without an agent, or one that does not answer, keeps its mounts
    and the ladder goes on (the report then lists none: they could not be seen)."""
    if agent_socket is None:
        return ()
    deadline = time.monotonic() + budget
    try:
        with GuestAgent(agent_socket, timeout=min(5.0, budget)) as agent:
            agent.wait_ready(time.monotonic() + min(5.0, budget))
            mounts = _network_mounts(agent, deadline)
            if detach and mounts:
                mounts = _release(agent, mounts, deadline, release_for)
    except (VMError, StepTimeout) as exc:
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


def _release(agent: GuestAgent, mounts: list[NetworkMount], deadline: float,
             release_for: float) -> list[NetworkMount]:
    # deepest first: a share mounted inside another leaves before its parent
    escaped = [_escape(m.mountpoint) for m in
               sorted(mounts, key=lambda m: -m.mountpoint.count("/"))]
    code, _, err = agent.run(["/bin/sh", "-c", LAUNCH, "kvmsnap", RELEASE_LOOP,
                              str(int(release_for)), *escaped], _left(deadline))
    if code == 0:
        outcome = FORCED
    elif code is None:
        outcome = "the release loop did not start in time; left to the guest"
    else:
        outcome = f"the release loop did not start ({err.strip() or code}); left to the guest"
    return [NetworkMount(m.source, m.mountpoint, m.fstype, m.options, outcome)
            for m in mounts]


def _left(deadline: float) -> float:
    return max(0.5, deadline - time.monotonic())


def _escape(path: str) -> str:
    """As /proc/mounts writes it (the loop greps for it there)."""
    for code, char in (("\\134", "\\"), ("\\040", " "), ("\\011", "\t"), ("\\012", "\n")):
        path = path.replace(char, code)
    return path


def _unescape(field: str) -> str:
    r"""/proc/mounts writes space, tab, newline and backslash as octal (``\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
