"""contrib/kvmsnap-verify.service and .timer: systemd accepts them, the service runs a
`kvmsnap verify` kvmsnap's own parser takes (of the config the backups use), weekly, and
`make install` puts them in place like the backup units."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from test_watchdog_arming import unit_settings

from kvmsnap_plugin.cli import build_parser
from kvmsnap_plugin.cli.verify import cmd_verify

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("kvmsnap-verify.service", "kvmsnap-verify.timer")


def test_systemd_accepts_the_verify_units(tmp_path):
    for name in UNITS:  # /usr/local/bin/kvmsnap is where make install puts it, not here
        text = (ROOT / "contrib" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/kvmsnap", sys.executable))
    done = subprocess.run(["systemd-analyze", "verify", *(tmp_path / n for n in UNITS)],
                          capture_output=True, text=True, timeout=60)
    # an unknown key or a bad value is only a warning on stderr
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_service_verifies_the_latest_backups_of_the_backups_config():
    verify = unit_settings(ROOT / "contrib/kvmsnap-verify.service")
    backup = unit_settings(ROOT / "contrib/kvmsnap-backup.service")
    argv, backup_argv = shlex.split(verify["ExecStart"]), shlex.split(backup["ExecStart"])
    assert argv[0] == backup_argv[0]  # make install rewrites both alike
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_verify and args.config == backup_argv[-1]
    assert not (args.borg or args.restic or args.vm)  # every VM's latest backup
    assert verify["EnvironmentFile"] == backup["EnvironmentFile"]  # the repositories' secrets
    assert verify["KillMode"] == "mixed"  # a stop lets kvmsnap stop its copy and clean up


def test_the_timer_starts_it_weekly_and_make_install_puts_both_in_place():
    timer = unit_settings(ROOT / "contrib/kvmsnap-verify.timer")
    assert "Unit" not in timer  # the service of its own name
    shown = subprocess.run(["systemd-analyze", "calendar", "--iterations", "2",
                            timer["OnCalendar"]], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    first, second = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S") for t in
                     re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", shown))
    assert (second - first).days == 7
    units = re.search(r"^UNITS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert set(UNITS) <= set(units.group(1).split())
    assert '"contrib/*.*"' in (ROOT / "pyproject.toml").read_text()  # in the wheel
