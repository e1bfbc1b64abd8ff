"""kvmsnap installed as a sysadmin installs it: from its wheel into a venv of its own (what
pipx does), and by `make install` (staged with DESTDIR here: nothing outside it touched).

No guest boots; `kvmsnap doctor` asks the host's QEMU what it can do. pip fetches the build
backend and the dependencies from the package index (CI has network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmsnap_plugin.model import VERSION

CHECKOUT = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "demo-out", "out",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")
#: where a real `make install` puts things: a staged install must leave them as they are
LIVE_PATHS = [Path("/opt/kvmsnap"), Path("/usr/local/bin/kvmsnap"), Path("/etc/kvmsnap"),
              Path("/etc/systemd/system/kvmsnap-backup.service"),
              Path("/etc/systemd/system/kvmsnap-backup.timer")]


def run(argv, *, timeout: float = 600, ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A program with the checkout kept out of its imports (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(kwargs.pop("env", {}))
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)
    if ok:
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The checkout's files, copied: building leaves build/ and *.egg-info behind."""
    src = tmp_path_factory.mktemp("install") / "src"
    shutil.copytree(CHECKOUT, src, ignore=NOT_SOURCE, symlinks=True)
    return src


@pytest.fixture(scope="module")
def venv(source: Path, tmp_path_factory) -> Path:
    """A fresh venv with kvmsnap installed from the wheel built from the checkout."""
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source])
    wheel, = dist.glob("kvmsnap_plugin-*.whl")
    venv = tmp_path_factory.mktemp("venv") / "kvmsnap"
    run(["python3", "-m", "venv", venv])
    run([venv / "bin" / "pip", "install", "-q", wheel])
    return venv


def test_the_wheel_installs_the_command_hooks_and_units(venv: Path, tmp_path: Path):
    where = run([venv / "bin" / "python", "-c", "import kvmsnap_plugin; "
                 "print(kvmsnap_plugin.__file__)"], cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # the installed package, not the checkout
    assert run([venv / "bin" / "kvmsnap", "--version"]).stdout.strip() == f"kvmsnap {VERSION}"
    share = venv / "share" / "kvmsnap"
    for name in ("hooks/kvmsnap-borgmatic-before", "hooks/kvmsnap-borgmatic-after",
                 "contrib/kvmsnap-restic", "contrib/kvmsnap-notify"):
        assert os.access(share / name, os.X_OK), name
    for name in ("hooks/kvmsnap-borgmatic-before", "contrib/kvmsnap-backup.service",
                 "contrib/kvmsnap-backup.timer", "contrib/kvmsnap.toml", "README.md"):
        assert (share / name).read_bytes() == (CHECKOUT / name).read_bytes(), name


@pytest.mark.qemu  # the doctor asks the host's QEMU binaries (no guest boots)
def test_the_installed_doctor_judges_the_host_and_finds_the_hooks(venv: Path, tmp_path: Path):
    # an empty cache: no demo guest, no probe of one; the doctor boots the host's kernel
    done = run([venv / "bin" / "kvmsnap", "doctor", "--json"], cwd=tmp_path, timeout=300,
               env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert all(c["status"] in ("ok", "warn") for c in checks.values()), checks
    assert checks["qemu"]["status"] == "ok"
    assert checks["ram-method"]["status"] in ("ok", "warn")
    assert checks["accelerator"]["detail"].startswith(("kvm", "tcg", "not probed"))
    assert checks["hooks"]["status"] == "ok"
    assert f"hook scripts in {venv / 'share' / 'kvmsnap' / 'hooks'}" in checks["hooks"]["detail"]


def test_the_installed_hook_scripts_run_the_installed_kvmsnap(venv: Path, tmp_path: Path):
    hooks = venv / "share" / "kvmsnap" / "hooks"
    path = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    before = run([hooks / "kvmsnap-borgmatic-before", "--help"], env=path, cwd=tmp_path)
    assert before.stdout.startswith("usage: kvmsnap mount"), before.stdout
    after = run([hooks / "kvmsnap-borgmatic-after", "--help"], env=path, cwd=tmp_path)
    assert after.stdout.startswith("usage: kvmsnap release"), after.stdout
    # a real run of the hook: the VM is not running, borgmatic's soft skip
    skipped = run([hooks / "kvmsnap-borgmatic-before", "--qmp", tmp_path / "gone.qmp",
                   "--skip-missing"], env=path, cwd=tmp_path, ok=False)
    assert skipped.returncode == 75, skipped.stderr
    # the notification example runs with nothing configured (no URL: nothing to tell)
    notify = venv / "share" / "kvmsnap" / "contrib" / "kvmsnap-notify"
    run([notify], env={"KVMSNAP_VM": "web", "KVMSNAP_STATUS": "error"})


def listing(paths: list[Path]) -> list[tuple[str, int]]:
    """Every file under ``paths``, with its modification time."""
    found = []
    for root in paths:
        for path in [root, *(root.rglob("*") if root.is_dir() else [])]:
            if path.is_symlink() or path.exists():
                found.append((str(path), path.lstat().st_mtime_ns))
    return sorted(found)


def test_a_staged_make_install_puts_everything_where_the_units_say(source: Path,
                                                                  tmp_path: Path):
    stage = tmp_path / "stage"
    before = listing(LIVE_PATHS)
    run(["make", "-C", source, "install", f"DESTDIR={stage}"])
    assert listing(LIVE_PATHS) == before  # nothing outside DESTDIR
    command = stage / "usr/local/bin/kvmsnap"
    assert os.readlink(command) == "/opt/kvmsnap/venv/bin/kvmsnap"
    assert os.readlink(stage / "opt/kvmsnap/hooks") == "/opt/kvmsnap/venv/share/kvmsnap/hooks"
    script = stage / "opt/kvmsnap/venv/bin/kvmsnap"
    assert script.read_text().splitlines()[0].startswith("#!/opt/kvmsnap/venv/bin/python")
    leaked = run(["grep", "-rlI", "-F", str(stage), stage], ok=False)
    assert leaked.returncode == 1, leaked.stdout  # no file names the staging directory
    unit = (stage / "etc/systemd/system/kvmsnap-backup.service").read_text()
    assert "ExecStart=/usr/local/bin/kvmsnap backup --config /etc/kvmsnap/kvmsnap.toml" in unit
    assert (stage / "etc/systemd/system/kvmsnap-backup.timer").exists()
    assert (stage / "opt/kvmsnap/venv/share/kvmsnap/hooks/kvmsnap-borgmatic-before").exists()
    example = stage / "etc/kvmsnap/kvmsnap.toml.example"
    assert oct(example.stat().st_mode & 0o777) == "0o600"
    python = stage / "opt/kvmsnap/venv/bin/python"
    version = run([python, "-m", "kvmsnap_plugin.cli", "--version"], cwd=tmp_path).stdout
    assert version.strip() == f"kvmsnap {VERSION}"

    run(["make", "-C", source, "uninstall", f"DESTDIR={stage}"])
    left = sorted(str(p.relative_to(stage)) for p in stage.rglob("*")
                  if p.is_file() or p.is_symlink())
    assert left == [], left
    assert listing(LIVE_PATHS) == before
