from __future__ import annotations

import json
import subprocess
import sys

from kvmsnap_plugin.host import probes
from kvmsnap_plugin.host.hugepages import collapse_supported


def test_doctor_reports_this_host(accel):
    out = subprocess.run([sys.executable, "-m", "kvmsnap_plugin.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    major, minor, _ = probes.qemu_version()
    assert checks["qemu"]["status"] == "ok"
    assert f"QEMU {major}.{minor}" in checks["qemu"]["detail"]
    assert checks["accelerator"]["detail"].startswith(accel)
    uffd_ok, _ = probes.uffd_wp_supported()
    assert (checks["background-snapshot"]["status"] == "ok") == uffd_ok
    assert (checks["huge-pages"]["status"] == "ok") == collapse_supported()[0]
    for tool in ("borg", "restic", "borgmatic", "fuse", "loop", "qemu-storage-daemon"):
        assert checks[tool]["status"] == "ok", checks[tool]
