"""The clone's release loop, run on the host: stuck umounts of a mount already gone are
killed, the umount helpers (umount.nfs4...) too, and nothing else."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from kvmsnap_plugin.vm.network_fs import RELEASE_LOOP

#: stands for a umount stuck in the kernel on a dead server (its comm is the file's name)
STUCK = "#!/bin/sh\nwhile :; do sleep 0.1; done\n"


def stuck(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    program = tmp_path / name
    program.write_text(STUCK)
    program.chmod(0o755)
    proc = subprocess.Popen([program, *args])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != name:
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.05)
    return proc


def test_stuck_umount_helpers_of_a_gone_mount_are_killed_others_left(tmp_path):
    gone = f"/mnt/kvmsnap-gone-{tmp_path.name}"
    helper = stuck(tmp_path, "umount.nfs4", gone, "-n")
    plain = stuck(tmp_path, "umount", "-c", gone)
    other = stuck(tmp_path, "umount.nfs", f"{gone}-other", "-n")
    try:
        loop = subprocess.run(["/bin/sh", "-c", RELEASE_LOOP, "release", "30", gone],
                              timeout=60)
        assert loop.returncode == 0
        assert helper.wait(10) == -9 and plain.wait(10) == -9
        assert other.poll() is None
    finally:
        for proc in (helper, plain, other):
            proc.kill()
            proc.wait()
