"""Configuration files: good ones load, bad ones say exactly what is wrong, on one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmsnap_plugin.config import EXAMPLE, command_line_targets, load_config
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
    RunSettings,
    ShutdownPolicy,
    VmCommands,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager

REPO = Path(__file__).resolve().parents[2]
TYPES = Hooks(plugin_manager(entry_points=False)).archiver_types()
#: a VM that goes somewhere, to prefix configs that test other things
VM = '[[vm]]\nqmp = "/run/a.qmp"\narchivers = ["b"]\n'
BORG = '[archiver.b]\ntype = "borg"\nrepository = "/srv/borg"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvmsnap.toml"
    path.write_text(text)
    return path


def jobs_of(tmp_path: Path, text: str, **overrides):
    return load_config(write(tmp_path, text), TYPES, overrides).jobs


def refusal(tmp_path: Path, text: str, **overrides) -> str:
    """The one line the CLI would print."""
    with pytest.raises(UsageError) as info:
        load_config(write(tmp_path, text), TYPES, overrides)
    line = info.value.one_line()
    assert "\n" not in line
    return line


def test_the_contrib_example_loads_and_is_what_config_example_prints():
    assert (REPO / "contrib" / "kvmsnap.toml").read_text() == EXAMPLE
    jobs, run = load_config(REPO / "contrib" / "kvmsnap.toml", TYPES)
    assert [j.name for j in jobs] == ["web", "db"]
    web, db = jobs
    assert [t.name for t in web.targets] == ["local-borg", "offsite-restic"]
    assert db.targets[0].mode == "both" and db.fork.shutdown.timeout == 600
    assert web.targets[1].option("repository") == "sftp:backup@offsite:/srv/restic"
    assert web.targets[1].option("tags") == ["nightly"]
    assert run == RunSettings(max_clones=1)
    assert web.commands.on_failure == ("logger", "-t", "kvmsnap", "a VM backup failed")


@pytest.mark.parametrize("text, line", [
    ('[archiver.offsite]\ntype = "restic"\ntags = "nightly"\n',
     '[archiver.offsite] tags: expected a list of strings, got "nightly" '
     '(fix: write tags = ["nightly"])'),
    ('[archiver.b]\ntype = "borg"\nextra_args = "--progress"\n',
     '[archiver.b] extra_args: expected a list of strings, got "--progress" '
     '(fix: write extra_args = ["--progress"])'),
    ('[archiver.b]\ntype = "restic"\ntags = ["a", 1]\n',
     '[archiver.b] tags: expected a list of strings, got ["a", 1]'),
    ('[archiver.b]\ntype = "borg"\ntimeout = "1h"\n',
     '[archiver.b] timeout: expected a number of seconds above 0, got "1h"'),
    ('[archiver.b]\ntype = "borg"\nenv = "BORG_PASSPHRASE=x"\n',
     '[archiver.b] env: expected a table of strings, got "BORG_PASSPHRASE=x"'),
    ('[archiver.b]\ntype = "borg"\nenv = { BORG_PASSCOMMAND = 3 }\n',
     '[archiver.b] env: expected a table of strings, got { BORG_PASSCOMMAND = 3 }'),
])
def test_archiver_type_errors_name_the_file_table_key_and_type(tmp_path, text, line):
    found = refusal(tmp_path, VM + text)
    assert found.startswith(f"{tmp_path / 'kvmsnap.toml'} {line}"), found


def test_archivers_given_as_a_string_are_refused_not_split(tmp_path):
    line = refusal(tmp_path, '[[vm]]\nqmp = "/a"\narchivers = "b"\n' + BORG)
    assert '[[vm]] #1 archivers: expected a list of [archiver.NAME] names, got "b"' in line
    assert 'write archivers = ["b"]' in line


@pytest.mark.parametrize("key, value, expected", [
    ("shutdown_timeout", '"soon"', "a number of seconds, at least 1"),
    ("shutdown_timeout", "0.1", "a number of seconds, at least 1"),
    ("repress_after", "-1", "a number of seconds"),
    ("mode", '"tarball"', "files or image or both"),
    ("method", '"fast"', "auto or background-snapshot or stop-and-copy"),
    ("on_unclean", '"ignore"', "fail or crash-consistent"),
    ("collapse_huge_pages", '"yes"', "true or false"),
    ("allow_remote_workdir", "1", "true or false"),
    ("min_free", '"lots"', "a size such as"),
    ("min_free", "-1", "a size such as"),
    ("min_free", "true", "a size such as"),
    ("max_pause", "0", "a number of seconds above 0"),
    ("max_pause", '"soon"', "a number of seconds above 0"),
    ("max_pause", "true", "a number of seconds above 0"),
    ("workdir", "5", "a directory path"),
    ("clone_drop", '"set"', "a list of option names"),
    ("skip_partitions", '"label:SWAP"', "a list of rules"),
    ("on_failure", '"curl https://x"', "a command as a list of strings"),
    ("on_success", "[]", "a command as a list of strings"),
    ("luks_keys", '"/root/k"', "a table of LUKS UUID = key file path"),
])
def test_run_key_errors_say_the_expected_type(tmp_path, key, value, expected):
    for table in ("[defaults]\n", ""):  # in [defaults] or in the [[vm]] itself
        text = f"{table}{key} = {value}\n{BORG}" if table else VM + f"{key} = {value}\n" + BORG
        line = refusal(tmp_path, text)
        where = "[defaults]" if table else "[[vm]] #1"
        assert f"kvmsnap.toml {where} {key}: expected {expected}" in line, line
        assert f"got {value}" in line and "(fix: " in line


def test_values_a_model_refuses_keep_the_models_reason(tmp_path):
    assert "cannot read skip rule 'swap'" in refusal(
        tmp_path, VM + 'skip_partitions = ["swap"]\n' + BORG)
    assert "cannot drop 'drive,if=none' from the clone" in refusal(
        tmp_path, VM + 'clone_drop = ["drive,if=none"]\n' + BORG)


@pytest.mark.parametrize("text, message", [
    ('[[vm]]\nqmp = "/a"\ncolour = "red"\n', "[[vm]] #1: unknown key 'colour'"),
    ('[defaults]\nshutdown_timout = 5\n' + VM, "did you mean 'shutdown_timeout'?"),
    ('[vms]\n' + VM, "unknown key 'vms'"),
    ('[run]\nmax_clone = 2\n' + VM, "[run]: unknown key 'max_clone'"),
    ('[[vm]]\nname = "x"\n', '[[vm]] #1 "x" needs one of qmp or domain'),
    ('[[vm]]\nqmp = "/a"\ndomain = "d"\n', "needs one of qmp or domain"),
    ('[[vm]]\nqmp = "/a"\narchivers = ["nope"]\n', "archivers: 'nope' is not defined"),
    ('[archiver.x]\ntype = "tape"\n' + VM + BORG, "[archiver.x] type: unknown archiver type "
                                                   '"tape" (fix: use one of: borg, restic'),
    ('[archiver.x]\nrepository = "/r"\n' + VM + BORG, "[archiver.x]: type is missing"),
    ('[archiver.x]\ntype = "borg"\nrepo = "/r"\n' + VM + BORG, "unknown key 'repo'"),
    ('[archiver.x]\ntype = "borg"\ntags = ["a"]\n' + VM + BORG, "unknown key 'tags'"),
    ('[run]\nmax_clones = 0\n' + VM + BORG, "[run] max_clones: expected a whole number, "
                                              "at least 1, got 0"),
    ('[run]\nexclude = "test-*"\n' + VM + BORG, '[run] exclude: expected a list of VM names '
                                                  'or globs, got "test-*"'),
    ('[run]\nmin_free_ram = "much"\n' + VM + BORG, "[run] min_free_ram: expected a size"),
    ('[[vm]]\nqmp = "/a"\n', "[[vm]] #1 has no archivers"),
    ('[defaults]\narchivers = ["b"]\n' + VM + BORG, "[defaults]: unknown key 'archivers'"),
    ('[[vm]]\nname = "w"\nqmp = "/a"\nkeep = "/k"\n[[vm]]\nname = "w"\nqmp = "/b"\n'
     'keep = "/k"\n', "two [[vm]] tables are named 'w'"),
    ('defaults = 3\n' + VM + BORG, "[defaults]: expected a table, got 3"),
    ("[[vm]\n", "not valid TOML"),
    ("", "lists no [[vm]]"),
])
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, message):
    assert message in refusal(tmp_path, text)


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(UsageError, match="no such config file"):
        load_config(tmp_path / "nope.toml", TYPES)


def test_a_vm_needs_archivers_or_keep(tmp_path):
    assert "add archivers = [\"NAME\"]" in refusal(tmp_path, '[[vm]]\nqmp = "/a"\n' + BORG)
    [job] = jobs_of(tmp_path, '[defaults]\nkeep = "/srv/keep"\n[[vm]]\nqmp = "/a"\n')
    assert job.targets == () and job.fork.keep_dir == Path("/srv/keep")


def test_restic_tags_and_extra_args_stay_lists(tmp_path):
    [job] = jobs_of(tmp_path, VM + '[archiver.b]\ntype = "restic"\nrepository = "/r"\n'
                    'tags = ["nightly"]\nextra_args = ["--exclude-caches"]\n')
    assert job.targets[0].option("tags") == ["nightly"]
    assert job.targets[0].option("extra_args") == ["--exclude-caches"]


def test_plugin_keys_known_by_name_take_any_value(tmp_path):
    types = {**TYPES, "tarball": frozenset({"directory", "level"})}
    path = write(tmp_path, '[[vm]]\nqmp = "/a"\narchivers = ["t"]\n'
                           '[archiver.t]\ntype = "tarball"\ndirectory = "/t"\nlevel = 9\n')
    [job], _run = load_config(path, types)
    assert job.targets[0].options == {"directory": "/t", "level": 9}


def test_run_settings_and_commands(tmp_path):
    path = write(tmp_path, '[run]\nmax_clones = 3\nmin_free_ram = "2G"\nall_domains = true\n'
                           'metrics_file = "/m/kvmsnap.prom"\nexclude = ["test-*"]\n'
                           '[defaults]\non_failure = ["mail", "-s", "failed", "root"]\n'
                           + VM + 'on_success = ["curl", "-fsS", "https://hc/1"]\n'
                           '[[vm]]\ndomain = "web"\narchivers = ["b"]\n'
                           'on_failure = ["true"]\n' + BORG)
    (a, web), run = load_config(path, TYPES)
    assert run == RunSettings(max_clones=3, min_free_ram=2 << 30, all_domains=True,
                              metrics_file=Path("/m/kvmsnap.prom"), exclude=("test-*",))
    assert a.commands == VmCommands(on_success=("curl", "-fsS", "https://hc/1"),
                                    on_failure=("mail", "-s", "failed", "root"))
    assert web.commands == VmCommands(on_failure=("true",))


def test_the_command_line_wins_over_the_file_for_every_vm(tmp_path):
    text = ('[defaults]\nshutdown_timeout = 100\nmethod = "stop-and-copy"\n' + VM +
            'mode = "image"\nshutdown_timeout = 600\n'
            '[[vm]]\nqmp = "/run/b.qmp"\narchivers = ["b"]\nmax_pause = 2\n' + BORG)
    a, b = jobs_of(tmp_path, text)
    assert (a.fork.shutdown.timeout, b.fork.shutdown.timeout) == (600, 100)
    assert a.targets[0].mode is Mode.IMAGE and b.fork.max_pause == 2
    a, b = jobs_of(tmp_path, text, shutdown_timeout=30.0, mode="both", method=None,
                   max_pause=4.0, keep="/k")
    assert (a.fork.shutdown.timeout, b.fork.shutdown.timeout) == (30, 30)
    assert [j.targets[0].mode for j in (a, b)] == [Mode.BOTH, Mode.BOTH]
    assert a.fork.method is b.fork.method is RamMethod.STOP_AND_COPY  # None: not given
    assert (a.fork.max_pause, b.fork.max_pause) == (4.0, 4.0)
    assert a.fork.keep_dir == b.fork.keep_dir == Path("/k")


def test_a_bad_command_line_option_names_the_flag(tmp_path):
    line = refusal(tmp_path, VM + BORG, max_pause=0.0)
    assert line.startswith("the command line --max-pause: expected a number of seconds above "
                           "0, got 0.0 (fix: e.g. --max-pause 5)")


def test_a_vm_without_a_name_is_named_by_the_vm_later(tmp_path):
    a, b, c = jobs_of(tmp_path, VM + '[[vm]]\nqmp = "/run/web/qmp.sock"\nname = "web"\n'
                      'archivers = ["b"]\n[[vm]]\ndomain = "mail"\narchivers = ["b"]\n' + BORG)
    assert (a.name, a.name_given) == ("/run/a.qmp", False)  # stands in until asked
    assert (b.name, b.name_given) == ("web", True)
    assert (c.name, c.name_given) == ("mail", True)  # the libvirt name
    assert a.named("demo").name == "demo" and b.named("demo").name == "web"


def test_collapse_huge_pages_is_on_unless_switched_off_and_has_a_budget(tmp_path):
    text = ('[defaults]\ncollapse_huge_pages = false\ncollapse_budget = 0.5\n' + VM +
            '[[vm]]\nqmp = "/run/b.qmp"\narchivers = ["b"]\ncollapse_huge_pages = true\n'
            + BORG)
    assert [(job.fork.collapse_huge_pages, job.fork.collapse_budget)
            for job in jobs_of(tmp_path, text)] == [(False, 0.5), (True, 0.5)]
    [job] = jobs_of(tmp_path, VM + BORG)
    assert job.fork.collapse_huge_pages is True and job.fork.collapse_budget == 2.0
    assert "above 0" in refusal(tmp_path, "[defaults]\ncollapse_budget = 0\n" + VM + BORG)


def test_relative_local_repositories_are_made_absolute(tmp_path):
    [job] = jobs_of(tmp_path, VM + '[archiver.b]\ntype = "borg"\nrepository = "repos/borg"\n')
    assert job.targets[0].option("repository") == str(tmp_path / "repos" / "borg")
    [target] = command_line_targets(["user@host:borg"], [], "files", TYPES)
    assert target.option("repository") == "user@host:borg"


def test_unset_options_take_the_model_defaults(tmp_path):
    [job] = jobs_of(tmp_path, '[[vm]]\ndomain = "web"\narchivers = ["b"]\n' + BORG)
    assert job.libvirt_uri == DEFAULT_LIBVIRT_URI and job.name == "web" and job.qmp is None
    assert job.fork == ForkOptions()  # every default, one place: the model
    assert job.fork.shutdown == ShutdownPolicy(SHUTDOWN_TIMEOUT, REPRESS_AFTER, OnUnclean.FAIL)
    assert job.fork.method is RamMethod.AUTO and job.targets[0].mode is Mode.FILES


def test_the_repress_delay_never_outlasts_the_timeout(tmp_path):
    [job] = jobs_of(tmp_path, VM + "shutdown_timeout = 30\n" + BORG)
    assert job.fork.shutdown.timeout == 30 and job.fork.shutdown.repress_after == 30


def test_the_margin_the_pause_cap_and_luks_keys_read_as_sizes_seconds_paths(tmp_path):
    text = ('[defaults]\nmin_free = "2G"\nmax_pause = 1.5\n' + VM +
            '[[vm]]\nqmp = "/run/b.qmp"\narchivers = ["b"]\nmin_free = 0\nmax_pause = 30\n'
            f'luks_keys = {{ "0B1C" = "{tmp_path / "k"}" }}\n' + BORG)
    (tmp_path / "k").write_text("key")
    a, b = jobs_of(tmp_path, text)
    assert (a.fork.min_free, a.fork.max_pause) == (2 << 30, 1.5)
    assert (b.fork.min_free, b.fork.max_pause) == (0, 30.0)
    assert b.fork.luks_keys == (("0b1c", tmp_path / "k"),)
    [job] = load_config(REPO / "contrib" / "kvmsnap.toml", TYPES).jobs[:1]
    assert job.fork.min_free == MIN_FREE == 1 << 30 and job.fork.max_pause == 5


def test_every_key_error_is_one_line_naming_the_key():
    """The messages read a field's description: every key has one, and an example."""
    from kvmsnap_plugin.config import schema

    for model in (schema.Defaults, schema.VmTable, schema.RunTable, schema.ArchiverTable,
                  *(schema.archiver_model(k, frozenset(v)) for k, v in TYPES.items())):
        for name, field in model.model_fields.items():
            assert field.description and field.examples, f"{model.__name__}.{name}"
            assert not re.search(r"\n", field.description)
