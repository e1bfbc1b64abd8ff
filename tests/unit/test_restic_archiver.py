"""The restic archiver without restic: its ``options`` (``-o KEY=VALUE``, e.g. sftp.command
for a remote repository), a typed list in the config given to every restic call, the
repository check included; and which of restic's error lines it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsnap_plugin.config import load_config
from kvmsnap_plugin.errors import ProcessError, UsageError
from kvmsnap_plugin.model import ArchiveTarget
from kvmsnap_plugin.plugin.archivers import restic
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager

TYPES = Hooks(plugin_manager(entry_points=False)).archiver_types()
VM = '[[vm]]\nqmp = "/run/a.qmp"\narchivers = ["r"]\n[archiver.r]\ntype = "restic"\n' \
     'repository = "sftp:backup@offsite:/srv/restic"\n'
SFTP = "sftp.command=ssh -p 2222 backup@offsite -s sftp"


def load(tmp_path: Path, text: str):
    path = tmp_path / "kvmsnap.toml"
    path.write_text(text)
    return load_config(path, TYPES).jobs


def test_options_load_as_a_list_and_reach_every_restic_call(tmp_path):
    [job] = load(tmp_path, VM + f'options = ["{SFTP}"]\n')
    target = job.targets[0]
    assert target.option("options") == [SFTP]
    assert restic._repository_args(target) == ["-r", "sftp:backup@offsite:/srv/restic",
                                               "-o", SFTP]
    assert restic._common(target, job, ["kvmsnap"])[:5] == \
        ["-r", "sftp:backup@offsite:/srv/restic", "-o", SFTP, "backup"]


def test_options_given_as_a_string_are_refused(tmp_path):
    with pytest.raises(UsageError) as info:
        load(tmp_path, VM + f'options = "{SFTP}"\n')
    assert "options" in info.value.one_line() and "list" in info.value.one_line()


def test_no_options_no_dash_o():
    target = ArchiveTarget("r", "restic", "files", {"repository": "rest:http://h:8000/"})
    assert restic._repository_args(target) == ["-r", "rest:http://h:8000/"]


def test_the_fatal_error_is_reported_not_the_lock_restic_could_not_remove_after_it():
    stderr = ('Save(<data/759a15fd4b>) returned error, retrying after 1.2s: connection refused\n'
              'error while unlocking: client.Do: Delete "http://h/demo/locks/c08": connection '
              'refusedFatal: unable to save snapshot: client.Post: connection refused\n'
              'error in cleanup handler: client.Do: Delete "http://h/demo/locks/c08"\n')
    target = ArchiveTarget("r", "restic", "image", {"repository": "rest:http://h/demo/"})
    error = restic._explain(ProcessError("restic failed with exit code 1: error in cleanup "
                                         "handler: ...", "run it by hand", returncode=1,
                                         stderr=stderr), target)
    assert str(error) == ("restic backup failed: Fatal: unable to save snapshot: "
                          "client.Post: connection refused")


def _explained(stderr: str) -> str:
    target = ArchiveTarget("r", "restic", "image", {"repository": "rest:http://h/demo/"})
    return str(restic._explain(ProcessError("restic failed with exit code 1", "run it by hand",
                                            returncode=1, stderr=stderr), target))


def test_retries_naming_the_config_file_are_not_taken_for_a_missing_repository():
    # a server gone mid-backup: restic's retries may name the config file before it gives up
    stderr = ('Load(<config/0000000000>, 0, 0) returned error, retrying after 552ms: '
              'unable to open config file: Get "http://h/demo/config": connection refused\n'
              'Fatal: unable to save snapshot: client.Post: connection refused\n')
    assert _explained(stderr) == ("restic backup failed: Fatal: unable to save snapshot: "
                                  "client.Post: connection refused")


def test_a_missing_repository_and_a_wrong_password_are_named():
    missing = ("Fatal: unable to open config file: Stat: stat /r/config: no such file or "
               "directory\nIs there a repository at the following location?\n/r\n")
    assert _explained(missing) == "restic: no repository at rest:http://h/demo/"
    wrong = "Fatal: wrong password or no key found\n"
    assert _explained(wrong) == "restic: wrong password for rest:http://h/demo/"
