"""A TOML file (many VMs) or command-line options (one VM) -> BackupJobs and RunSettings.

Each table is checked against its model (:mod:`kvmsnap_plugin.config.schema`) on its own,
so an error names the table it is in; then a VM's settings are the ``[defaults]``, its
``[[vm]]`` table over them, and the command line's options over both.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from kvmsnap_plugin.config.messages import checked, toml, unknown_key
from kvmsnap_plugin.config.schema import (
    ArchiverTable,
    Defaults,
    RunKeys,
    RunTable,
    VmTable,
    archiver_model,
)
from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model import (
    MAX_PAUSE,
    MIN_FREE,
    REPRESS_AFTER,
    SHUTDOWN_TIMEOUT,
    ArchiveTarget,
    BackupJob,
    ForkOptions,
    Mode,
    OnUnclean,
    RamMethod,
    RunSettings,
    ShutdownPolicy,
    VerifySettings,
    VmCommands,
)
from kvmsnap_plugin.model.job import VERIFY_TIMEOUT
from kvmsnap_plugin.paths import DEFAULT_WORKDIR
from kvmsnap_plugin.plugin.archive import absolute_repository

TABLES = frozenset({"defaults", "vm", "archiver", "run"})
#: command-line options with no config key (one VM's, or debugging)
COMMAND_LINE_ONLY = frozenset({"clone_console", "pid", "libvirt_uri"})
COMMANDS = ("on_success", "on_warning", "on_failure")


class Config(NamedTuple):
    jobs: list[BackupJob]
    run: RunSettings


def load_config(path: Path, archiver_types: Mapping[str, frozenset[str]],
                overrides: Mapping[str, Any] | None = None) -> Config:
    """One job per [[vm]], and the [run] settings. ``overrides`` (command-line options,
    by config key) win over the file for every VM."""
    data = _read(path)
    for name in data:
        if name not in TABLES:
            raise unknown_key(name, set(TABLES), str(path))
    command_line = command_line_settings(overrides or {})
    defaults = checked(Defaults, data.get("defaults", {}), f"{path} [defaults]").settings()
    run = run_settings(checked(RunTable, data.get("run", {}), f"{path} [run]"),
                       command_line.get("libvirt_uri"))
    archivers = data.get("archiver", {})
    if not isinstance(archivers, dict):
        raise UsageError(f"{path} archiver: expected tables, got {toml(archivers)}",
                         'write [archiver.NAME] tables with type = "borg" or "restic"')
    targets = {name: _archiver(name, table, archiver_types, path)
               for name, table in archivers.items()}
    vms = data.get("vm", [])
    if not isinstance(vms, list) or not vms:
        raise UsageError(f"{path} lists no [[vm]]", "add a [[vm]] table with qmp = SOCKET")
    jobs = [_job(*_vm_table(vm, index, path), (defaults, command_line), targets, run)
            for index, vm in enumerate(vms, 1)]
    _refuse_duplicates(jobs, path)
    return Config(jobs, run)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no such config file: {path}", "pass an existing --config "
                         "(`kvmsnap config example` prints one)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}", "fix the syntax") from None


def _vm_table(table: Any, index: int, path: Path) -> tuple[VmTable, str]:
    name = table.get("name") if isinstance(table, dict) else None
    where = f"{path} [[vm]] #{index}" + (f" {toml(name)}" if isinstance(name, str) else "")
    vm = checked(VmTable, table, where)
    if (vm.qmp is None) == (vm.domain is None):
        raise UsageError(f"{where} needs one of qmp or domain",
                         "add qmp = \"/path/to/qmp.sock\" or domain = \"NAME\"")
    return vm, where


def _job(vm: VmTable, where: str, around: tuple[dict[str, Any], dict[str, Any]],
         archivers: Mapping[str, ArchiveTarget], run: RunSettings) -> BackupJob:
    """One [[vm]] table between the settings ``around`` it: its own keys win over the
    [defaults], the command line's options over both."""
    defaults, command_line = around
    settings = {**defaults, **vm.settings(), **command_line}
    mode = Mode(settings.get("mode", Mode.FILES))
    targets = []
    for name in vm.archivers or []:
        if name not in archivers:
            raise UsageError(f"{where} archivers: {name!r} is not defined",
                             f"define [archiver.{name}] (defined: "
                             f"{', '.join(archivers) or 'none'})")
        targets.append(replace(archivers[name], mode=mode))
    if not targets and not settings.get("keep"):
        raise UsageError(f"{where} has no archivers: its backup would go nowhere",
                         'add archivers = ["NAME"] naming an [archiver.NAME] table '
                         '(or keep = "DIR" for clean disk images)')
    return BackupJob(vm.name or vm.domain or vm.qmp or "", Path(vm.qmp) if vm.qmp else None,
                     _fork_options(settings), tuple(targets), domain=vm.domain,
                     libvirt_uri=settings.get("libvirt_uri") or run.libvirt_uri,
                     commands=VmCommands(*(tuple(settings.get(c, ())) for c in COMMANDS)),
                     name_given=bool(vm.name or vm.domain),
                     verify=_verify_settings(settings, mode, where))


def _verify_settings(settings: Mapping[str, Any], mode: Mode, where: str) -> VerifySettings:
    """``verify = true`` boots the backup's image archive: a files-only backup has none."""
    if settings.get("verify") and mode is Mode.FILES:
        raise UsageError(f"{where}: verify = true needs an image archive, and mode is files",
                         'set mode = "image" or "both", or verify files archives with '
                         "`kvmsnap verify --borg REPO::ARCHIVE --file PATH`")
    return VerifySettings(bool(settings.get("verify")), tuple(settings.get("verify_command",
                                                                           ())),
                          settings.get("verify_console", ""),
                          settings.get("verify_timeout", VERIFY_TIMEOUT),
                          tuple(settings.get("verify_files", ())))


def _refuse_duplicates(jobs: list[BackupJob], path: Path) -> None:
    """Two VMs of one name would share a mount root, kept images and archive names."""
    seen: set[str] = set()
    for job in jobs:
        if job.name_given and job.name in seen:
            raise UsageError(f"{path}: two [[vm]] tables are named {job.name!r}",
                             "give each VM its own name")
        seen.add(job.name)


def _archiver(name: str, table: Any, archiver_types: Mapping[str, frozenset[str]],
              path: Path) -> ArchiveTarget:
    where = f"{path} [archiver.{name}]"
    kind = table.get("type") if isinstance(table, dict) else None
    if kind not in archiver_types:
        checked(ArchiverTable, table, where)  # a missing type, or not a string
        raise UsageError(f"{where} type: unknown archiver type {toml(kind)}",
                         f"use one of: {', '.join(sorted(archiver_types))} (or install the "
                         "plugin that provides it)")
    options = checked(archiver_model(kind, archiver_types[kind]), table, where).settings()
    del options["type"]
    if isinstance(options.get("repository"), str):
        options["repository"] = absolute_repository(options["repository"], path.parent)
    return ArchiveTarget(name, kind, Mode.FILES, options)  # each [[vm]] sets its mode


def run_settings(table: RunTable, libvirt_uri: str | None = None) -> RunSettings:
    """[run] as the model's RunSettings (``libvirt_uri``: the command line's)."""
    settings = table.settings()
    if "metrics_file" in settings:
        settings["metrics_file"] = Path(settings["metrics_file"])
    if "exclude" in settings:
        settings["exclude"] = tuple(settings["exclude"])
    if libvirt_uri:
        settings["libvirt_uri"] = libvirt_uri
    return RunSettings(**settings)


def command_line_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line options (by config key; None: not given), checked like config keys."""
    given = {k: v for k, v in options.items() if v is not None}
    run_keys = {k: v for k, v in given.items() if k not in COMMAND_LINE_ONLY}
    return {**checked(RunKeys, run_keys, "the command line", flags=True).settings(),
            **{k: v for k, v in given.items() if k in COMMAND_LINE_ONLY}}


def fork_options(settings: Mapping[str, Any]) -> ForkOptions:
    """ForkOptions from command-line options under their config keys' names."""
    return _fork_options(command_line_settings(settings))


def _fork_options(settings: Mapping[str, Any]) -> ForkOptions:
    """ForkOptions from checked settings; what none sets takes the model's default."""
    def path(key: str) -> Path | None:
        return Path(settings[key]) if settings.get(key) else None

    timeout = settings.get("shutdown_timeout", SHUTDOWN_TIMEOUT)
    repress = settings.get("repress_after", REPRESS_AFTER)
    return ForkOptions(
        min_free=settings.get("min_free", MIN_FREE),
        max_pause=settings.get("max_pause", MAX_PAUSE),
        method=settings.get("method", RamMethod.AUTO),
        shutdown=ShutdownPolicy(timeout=timeout, repress_after=min(repress, timeout),
                                on_unclean=settings.get("on_unclean", OnUnclean.FAIL)),
        keep_dir=path("keep"),
        workdir=path("workdir") or DEFAULT_WORKDIR,
        overlay_dir=path("overlay_dir"),
        clone_console=path("clone_console"),
        pid=settings.get("pid"),
        mount_root=path("mount_root"),
        collapse_huge_pages=settings.get("collapse_huge_pages", True),
        clone_drop=tuple(settings.get("clone_drop", ())),
        allow_remote_workdir=settings.get("allow_remote_workdir", False),
        skip_partitions=tuple(settings.get("skip_partitions", ())),
        luks_keys=tuple((uuid.lower(), Path(file))
                        for uuid, file in settings.get("luks_keys", {}).items()),
        collapse_budget=settings.get("collapse_budget", ForkOptions.collapse_budget),
    )


def command_line_targets(borg: list[str], restic: list[str], mode: str | Mode | None,
                         archiver_types: Mapping[str, frozenset[str]]) -> tuple[ArchiveTarget, ...]:
    """``--borg REPO`` / ``--restic REPO`` as archive targets."""
    mode = Mode(command_line_settings({"mode": mode}).get("mode", Mode.FILES))
    targets = []
    for kind, repos in (("borg", borg), ("restic", restic)):
        if repos and kind not in archiver_types:
            raise UsageError(f"the {kind} archiver is not available", "reinstall kvmsnap")
        targets += [ArchiveTarget(kind if len(repos) == 1 else f"{kind}{i}", kind, mode,
                                  {"repository": absolute_repository(repo, Path.cwd())})
                    for i, repo in enumerate(repos)]
    return tuple(targets)
