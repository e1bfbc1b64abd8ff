"""Configuration files: good ones load, bad ones say exactly what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsnap_plugin.config import command_line_targets, load_config
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    ForkOptions,
    Mode,
    OnUnclean,
    RamMethod,
    ShutdownPolicy,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager

REPO = Path(__file__).resolve().parents[2]
TYPES = Hooks(plugin_manager(entry_points=False)).archiver_types()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvmsnap.toml"
    path.write_text(text)
    return path


def test_the_contrib_example_loads():
    jobs = load_config(REPO / "contrib" / "kvmsnap.toml", TYPES)
    assert [j.name for j in jobs] == ["web", "db"]
    web, db = jobs
    assert [t.name for t in web.targets] == ["local-borg", "offsite-restic"]
    assert db.targets[0].mode == "both" and db.fork.shutdown.timeout == 600
    assert web.targets[1].option("repository") == "sftp:backup@offsite:/srv/restic"


def test_collapse_huge_pages_is_off_unless_asked_for(tmp_path):
    path = write(tmp_path, '[defaults]\ncollapse_huge_pages = true\n'
                           '[[vm]]\nqmp = "/run/a.qmp"\n'
                           '[[vm]]\nqmp = "/run/b.qmp"\ncollapse_huge_pages = false\n')
    assert [job.fork.collapse_huge_pages for job in load_config(path, TYPES)] == [True, False]
    [job] = load_config(write(tmp_path, '[[vm]]\nqmp = "/run/a.qmp"\n'), TYPES)
    assert job.fork.collapse_huge_pages is False


def test_a_remote_work_directory_is_refused_unless_a_vm_allows_it(tmp_path):
    path = write(tmp_path, '[[vm]]\nqmp = "/run/a.qmp"\n'
                           '[[vm]]\nqmp = "/run/b.qmp"\nallow_remote_workdir = true\n')
    assert [job.fork.allow_remote_workdir for job in load_config(path, TYPES)] == [False, True]


def test_relative_local_repositories_are_made_absolute(tmp_path):
    path = write(tmp_path, '[[vm]]\nqmp = "/run/a.qmp"\narchivers = ["b"]\n'
                           '[archiver.b]\ntype = "borg"\nrepository = "repos/borg"\n')
    [job] = load_config(path, TYPES)
    assert job.targets[0].option("repository") == str(tmp_path / "repos" / "borg")
    [target] = command_line_targets(["user@host:borg"], [], "files", TYPES)
    assert target.option("repository") == "user@host:borg"


@pytest.mark.parametrize("text, message", [
    ('[[vm]]\nqmp = "/a"\ncolour = "red"\n', "unknown key 'colour'"),
    ('[defaults]\nshutdown_timout = 5\n[[vm]]\nqmp = "/a"\n', "unknown key 'shutdown_timout'"),
    ('[[vm]]\nname = "x"\n', "needs one of qmp or domain"),
    ('[[vm]]\nqmp = "/a"\ndomain = "d"\n', "needs one of qmp or domain"),
    ('[[vm]]\nqmp = "/a"\narchivers = ["nope"]\n', "archiver 'nope', which is not defined"),
    ('[archiver.x]\ntype = "tape"\n[[vm]]\nqmp = "/a"\n', "unknown archiver type 'tape'"),
    ('[archiver.x]\ntype = "borg"\nrepo = "/r"\n[[vm]]\nqmp = "/a"\n', "unknown key 'repo'"),
    ('[[vm]]\nqmp = "/a"\nmode = "tarball"\n', "unknown mode 'tarball'"),
    ('[[vm]]\nqmp = "/a"\nmethod = "fast"\n', "unknown RAM snapshot method"),
    ('[[vm]]\nqmp = "/a"\nshutdown_timeout = 0.1\n', "too small"),
    ('[[vm]]\nqmp = "/a"\nshutdown_timeout = "soon"\n', "bad timeout"),
    ('[[vm]]\nqmp = "/a"\non_unclean = "ignore"\n', "on-unclean"),
    ('[[vm]]\nqmp = "/a"\ncollapse_huge_pages = "yes"\n', "must be true or false"),
    ('[[vm]]\nqmp = "/a"\nallow_remote_workdir = 1\n', "allow_remote_workdir .* true or"),
    ('[[vm]]\nqmp = "/a"\nmin_free = "lots"\n', "min_free in .* must be a size"),
    ('[[vm]]\nqmp = "/a"\nmin_free = -1\n', "min_free in .* must be a size"),
    ('[[vm]]\nqmp = "/a"\nmax_pause = 0\n', "max_pause in .* above 0"),
    ('[[vm]]\nqmp = "/a"\nmax_pause = "soon"\n', "max_pause in .* above 0"),
    ('[[vm]]\nqmp = "/a"\nmax_pause = true\n', "max_pause in .* above 0"),
    ('[archiver.x]\ntype = "borg"\nenv = "BORG_PASSPHRASE=x"\n[[vm]]\nqmp = "/a"\n',
     "env must be a table"),
    ("[[vm]\n", "not valid TOML"),
    ("", "lists no [[vm]]"),
])
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("[[", r"\[\[")) as info:
        load_config(write(tmp_path, text), TYPES)
    assert info.value.hint


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(UsageError, match="no such config file"):
        load_config(tmp_path / "nope.toml", TYPES)


def test_unset_options_take_the_model_defaults(tmp_path):
    path = write(tmp_path, '[[vm]]\ndomain = "web"\narchivers = ["b"]\n'
                           '[archiver.b]\ntype = "borg"\nrepository = "/srv/borg"\n')
    [job] = load_config(path, TYPES)
    assert job.libvirt_uri == DEFAULT_LIBVIRT_URI and job.name == "web" and job.qmp is None
    assert job.fork == ForkOptions()  # every default, one place: the model
    assert job.fork.shutdown == ShutdownPolicy(SHUTDOWN_TIMEOUT, REPRESS_AFTER, OnUnclean.FAIL)
    assert job.fork.method is RamMethod.AUTO and job.targets[0].mode is Mode.FILES


def test_the_repress_delay_never_outlasts_the_timeout(tmp_path):
    [job] = load_config(write(tmp_path, '[[vm]]\nqmp = "/a"\nshutdown_timeout = 30\n'), TYPES)
    assert job.fork.shutdown.timeout == 30 and job.fork.shutdown.repress_after == 30


def test_the_margin_and_the_pause_cap_read_as_sizes_and_seconds(tmp_path):
    path = write(tmp_path, '[defaults]\nmin_free = "2G"\nmax_pause = 1.5\n'
                           '[[vm]]\nqmp = "/run/a.qmp"\n'
                           '[[vm]]\nqmp = "/run/b.qmp"\nmin_free = 0\nmax_pause = 30\n')
    a, b = load_config(path, TYPES)
    assert (a.fork.min_free, a.fork.max_pause) == (2 << 30, 1.5)
    assert (b.fork.min_free, b.fork.max_pause) == (0, 30.0)
    [job] = load_config(REPO / "contrib" / "kvmsnap.toml", TYPES)[:1]
    assert job.fork.min_free == MIN_FREE == 1 << 30 and job.fork.max_pause == 5
