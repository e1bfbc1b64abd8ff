from __future__ import annotations

import json
import subprocess
import sys

from kvmsnap_plugin.host import probes
from kvmsnap_plugin.host.doctor import ask_qemu
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
    assert checks["ram-method"]["detail"].startswith(
        "background-snapshot" if uffd_ok else "stop-and-copy"), checks["ram-method"]
    resume = checks["resume-logic"]["detail"]
    assert "decided per run by watching RESUME" in resume
    assert ("kvmsnap resumes the guest" if (major, minor) >= (9, 0) else
            "QEMU resumes the guest itself after the capture") in resume.split("expected")[1]
    for tool in ("borg", "restic", "borgmatic", "fuse", "loop", "qemu-storage-daemon"):
        assert checks[tool]["status"] == "ok", checks[tool]


def test_the_probe_asks_each_qemu_build_for_its_capabilities(qemu_build):
    version, capabilities = ask_qemu(qemu_build.binary, ["query-version",
                                                          "query-migrate-capabilities"])
    shown = version["return"]["qemu"]
    assert f"{shown['major']}.{shown['minor']}.{shown['micro']}" == qemu_build.version
    assert "background-snapshot" in {c["capability"] for c in capabilities["return"]}
