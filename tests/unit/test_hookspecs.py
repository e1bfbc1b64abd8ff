"""The plugin contract is documented: every hook has a full docstring and a README entry."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pluggy
import pytest

import kvmsnap_plugin
from kvmsnap_plugin import BackupJob, hookimpl, model
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.plugin import hookspecs
from kvmsnap_plugin.plugin.archivers import borg, restic
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
SAMPLE = REPO / "contrib" / "sample-plugin"
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
    assert {"kvmsnap_plugin.plugin.archivers.borg",
            "kvmsnap_plugin.plugin.archivers.restic"} <= names
    assert isinstance(pm, pluggy.PluginManager) and pm.project_name == "kvmsnap"


def named_types(annotation: str) -> set[str]:
    return set(re.findall(r"\b[A-Z][A-Za-z]+\b", annotation)) - {"None", "BaseException"}


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_argument_type_is_importable_from_the_package_root(name):
    function = getattr(hookspecs, name)
    signature = inspect.signature(function)
    annotations = [p.annotation for p in signature.parameters.values()]
    used = set().union(*map(named_types, [*annotations, signature.return_annotation]))
    documented = set(re.findall(r":(?:class|attr):`(?:kvmsnap_plugin\.)?(\w+)",
                                inspect.getdoc(function)))
    missing = sorted(t for t in used | documented if not hasattr(kvmsnap_plugin, t))
    assert missing == []
    for record in used:
        assert getattr(kvmsnap_plugin, record) is getattr(model, record)


def test_the_sample_plugin_imports_only_the_package_root():
    tree = ast.parse((SAMPLE / "kvmsnap_tarball" / "__init__.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    assert {m for m in modules if m and m.startswith("kvmsnap")} == {"kvmsnap_plugin"}


class Recorder:
    def __init__(self, name: str, calls: list[str], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    @hookimpl
    def kvmsnap_pre_backup(self):
        self.calls.append(f"pre_backup {self.name}")

    @hookimpl
    def kvmsnap_cleanup(self, report, error):
        self.calls.append(f"cleanup {self.name} {report} {type(error).__name__}")
        if self.fail:
            raise RuntimeError(f"{self.name} cannot clean up")


def test_entry_point_plugins_register_before_the_builtins_and_extras_after(monkeypatch):
    installed = Recorder("installed", [])

    def load(pm, group):
        assert group == "kvmsnap"
        pm.register(installed, name="installed")

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", load)
    extra = Recorder("extra", [])
    pm = plugin_manager([extra])
    called = [impl.plugin for impl in reversed(pm.hook.kvmsnap_pre_backup.get_hookimpls())]
    assert called == [extra, restic, borg, installed]  # pluggy calls the last registered first


def test_every_cleanup_runs_through_pluggy_even_when_one_raises(caplog):
    calls: list[str] = []
    first, broken, last = (Recorder("first", calls), Recorder("broken", calls, fail=True),
                           Recorder("last", calls))

    class Wrapper:
        @hookimpl(wrapper=True)
        def kvmsnap_cleanup(self):
            calls.append("wrapper")
            return (yield)

    pm = plugin_manager([Wrapper(), first, broken, last], entry_points=False)
    traced: list[str] = []
    pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append(name),
                               lambda outcome, name, impls, kwargs: None)
    Hooks(pm).cleanup(BackupJob("web", None), None, KeyError("x"))
    assert calls == ["wrapper", "cleanup last None KeyError",
                     "wrapper", "cleanup broken None KeyError",
                     "wrapper", "cleanup first None KeyError"]
    assert traced == ["kvmsnap_cleanup"] * 3
    assert "broken cannot clean up" in caplog.text
