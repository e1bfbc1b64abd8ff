"""The plugin contract is documented: every hook has a full docstring and a README entry."""

from __future__ import annotations

import inspect
from pathlib import Path

import pluggy
import pytest

from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.plugin import hookspecs
from kvmsnap_plugin.plugin.manager import plugin_manager

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
         if name.startswith("kvmsnap_")]


def test_there_are_hooks():
    assert {"kvmsnap_pre_backup", "kvmsnap_snapshot", "kvmsnap_post_shutdown",
            "kvmsnap_cleanup", "kvmsnap_archive"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.split()) >= 30, f"{name} needs a docstring saying when it runs and more"
    assert "firstresult" in doc, f"{name}'s docstring must say whether it is firstresult"
    assert f"`{name}(" in README, f"{name} is missing from the README's hook table"


@pytest.mark.parametrize("name", HOOKS)
def test_firstresult_matches_the_docstring(name):
    opts = getattr(hookspecs, name).kvmsnap_spec
    doc = inspect.getdoc(getattr(hookspecs, name))
    assert opts["firstresult"] == ("Not firstresult" not in doc and
                                   doc.count("firstresult") > 0 and "firstresult:" in doc)


def test_a_misspelt_hook_is_caught():
    class Typo:
        @hookimpl
        def kvmsnap_post_shutdwon(self, exposure):
            pass

    with pytest.raises(UsageError, match="unknown hook"):
        plugin_manager([Typo()], entry_points=False)


def test_builtin_archivers_are_plugins():
    pm = plugin_manager(entry_points=False)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"kvmsnap_plugin.plugin.archivers.borg", "kvmsnap_plugin.plugin.archivers.restic"} <= names
    assert isinstance(pm, pluggy.PluginManager) and pm.project_name == "kvmsnap"
