"""Configuration: a TOML file (many VMs) or command-line options (one VM) -> BackupJobs.

Example (contrib/kvmsnap.toml has a commented one)::

    [defaults]
    mode = "files"              # files | image | both
    shutdown_timeout = 300

    [[vm]]
    name = "web"
    qmp = "/run/qemu/web.qmp"
    archivers = ["local-borg"]

    [archiver.local-borg]
    type = "borg"
    repository = "/srv/backup/borg"

Unknown keys are rejected with their place and the keys that are allowed. Secrets never
live in this file: borg and restic read theirs from the environment (BORG_PASSPHRASE,
BORG_PASSCOMMAND, RESTIC_PASSWORD, RESTIC_PASSWORD_FILE), or from an archiver's ``env``
table that points at a command or file holding them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.host.resources import parse_size
from kvmsnap_plugin.model import (
    DEFAULT_LIBVIRT_URI,
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
    ShutdownPolicy,
)
from kvmsnap_plugin.paths import DEFAULT_WORKDIR
from kvmsnap_plugin.plugin.archive import absolute_repository

#: keys allowed in [defaults] and, as overrides, in each [[vm]]
RUN_KEYS = frozenset({"method", "mode", "workdir", "overlay_dir", "shutdown_timeout",
                      "repress_after", "on_unclean", "keep", "mount_root",
                      "collapse_huge_pages", "min_free", "max_pause", "clone_drop",
                      "allow_remote_workdir", "skip_partitions", "luks_keys"})
VM_KEYS = RUN_KEYS | {"name", "qmp", "domain", "libvirt_uri", "pid", "archivers"}
#: keys every archiver table has, whatever its type
COMMON_ARCHIVER_KEYS = frozenset({"type", "env", "archive_name", "extra_args"})


def load_config(path: Path, archiver_types: Mapping[str, frozenset[str]]) -> list[BackupJob]:
    """Read a TOML configuration into one job per [[vm]]."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no such config file: {path}", "pass an existing --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}", "fix the syntax") from None
    _check_keys(data, {"defaults", "vm", "archiver"}, f"{path}")
    defaults = data.get("defaults", {})
    _check_keys(defaults, RUN_KEYS, f"[defaults] of {path}")
    archivers = {name: _archiver(name, table, archiver_types, path)
                 for name, table in data.get("archiver", {}).items()}
    vms = data.get("vm", [])
    if not vms:
        raise UsageError(f"{path} lists no [[vm]]", "add a [[vm]] table with qmp = SOCKET")
    return [_job(vm, defaults, archivers, f"[[vm]] #{index + 1} of {path}")
            for index, vm in enumerate(vms)]


def _job(vm: Mapping[str, Any], defaults: Mapping[str, Any],
         archivers: Mapping[str, ArchiveTarget], where: str) -> BackupJob:
    """One [[vm]] table, over the [defaults], as a job."""
    _check_keys(vm, VM_KEYS, where)
    if ("qmp" in vm) == ("domain" in vm):
        raise UsageError(f"{where} needs one of qmp or domain",
                         "add qmp = \"/path/to/qmp.sock\" or domain = \"NAME\"")
    settings = {**defaults, **vm}
    mode = _mode(settings.get("mode", Mode.FILES), where)
    targets = []
    for name in vm.get("archivers", []):
        if name not in archivers:
            raise UsageError(f"{where} names archiver {name!r}, which is not defined",
                             f"define [archiver.{name}] (defined: "
                             f"{', '.join(archivers) or 'none'})")
        targets.append(replace(archivers[name], mode=mode))
    qmp = Path(vm["qmp"]) if "qmp" in vm else None
    name = vm.get("name") or vm.get("domain") or Path(vm["qmp"]).stem
    return BackupJob(name, qmp, fork_options(settings, where), tuple(targets),
                     domain=vm.get("domain"),
                     libvirt_uri=vm.get("libvirt_uri", DEFAULT_LIBVIRT_URI))


def fork_options(settings: Mapping[str, Any], where: str = "the command line") -> ForkOptions:
    """ForkOptions from config keys (or command-line options under the same names)."""
    def path(key: str) -> Path | None:
        return Path(settings[key]) if settings.get(key) else None

    try:
        timeout = float(settings.get("shutdown_timeout", SHUTDOWN_TIMEOUT))
        repress = float(settings.get("repress_after", REPRESS_AFTER))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad timeout in {where}: {exc}", "give seconds as a number") from None
    collapse = _flag(settings, "collapse_huge_pages", where)
    return ForkOptions(
        min_free=parse_size(settings.get("min_free", MIN_FREE), f"min_free in {where}"),
        max_pause=_max_pause(settings.get("max_pause", MAX_PAUSE), where),
        method=settings.get("method", RamMethod.AUTO),
        shutdown=ShutdownPolicy(timeout=timeout, repress_after=min(repress, timeout),
                                on_unclean=settings.get("on_unclean", OnUnclean.FAIL)),
        keep_dir=path("keep"),
        workdir=path("workdir") or DEFAULT_WORKDIR,
        overlay_dir=path("overlay_dir"),
        clone_console=path("clone_console"),
        pid=settings.get("pid"),
        mount_root=path("mount_root"),
        collapse_huge_pages=collapse,
        clone_drop=_clone_drop(settings.get("clone_drop", ()), where),
        allow_remote_workdir=_flag(settings, "allow_remote_workdir", where),
        skip_partitions=_skip_partitions(settings.get("skip_partitions", ()), where),
        luks_keys=luks_keys(settings.get("luks_keys", {}), where),
    )


def _skip_partitions(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"skip_partitions in {where} must be a list of rules, not {value!r}",
                         'e.g. skip_partitions = ["label:SWAP", "type:lvm-pv"]')
    return tuple(value)


def _clone_drop(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"clone_drop in {where} must be a list of option names, not "
                         f"{value!r}", 'e.g. clone_drop = ["set", "object:input-barrier"]')
    return tuple(value)


def _flag(settings: Mapping[str, Any], key: str, where: str) -> bool:
    value = settings.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{key} in {where} must be true or false, not {value!r}",
                         f"write {key} = true")
    return value


def _max_pause(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not seconds > 0:
        raise UsageError(f"max_pause in {where} must be a number of seconds above 0, not "
                         f"{value!r}", "e.g. max_pause = 5 (--max-pause 5)")
    return seconds


def _archiver(name: str, table: Mapping[str, Any],
              archiver_types: Mapping[str, frozenset[str]], path: Path) -> ArchiveTarget:
    where = f"[archiver.{name}] of {path}"
    kind = table.get("type")
    if kind not in archiver_types:
        raise UsageError(f"{where}: unknown archiver type {kind!r}",
                         f"use one of: {', '.join(sorted(archiver_types))} (or install the "
                         "plugin that provides it)")
    _check_keys(table, COMMON_ARCHIVER_KEYS | archiver_types[kind], where)
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise UsageError(f"{where}: env must be a table of strings",
                         'e.g. env = { BORG_PASSCOMMAND = "cat /root/.borg-pass" }')
    options = {k: v for k, v in table.items() if k != "type"}
    if isinstance(options.get("repository"), str):
        options["repository"] = absolute_repository(options["repository"], path.parent)
    return ArchiveTarget(name, kind, Mode.FILES, options)  # each [[vm]] sets its mode


def _mode(value: Any, where: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise UsageError(f"unknown mode {value!r} in {where}",
                         "use one of: " + ", ".join(Mode)) from None


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str] | set[str], where: str):
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise UsageError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(k) for k in unknown)} in {where}",
                         f"allowed: {', '.join(sorted(allowed))}")


def command_line_targets(borg: list[str], restic: list[str], mode: str | Mode,
                         archiver_types: Mapping[str, frozenset[str]]) -> tuple[ArchiveTarget, ...]:
    """``--borg REPO`` / ``--restic REPO`` as archive targets."""
    mode = _mode(mode, "--mode")
    targets = []
    for kind, repos in (("borg", borg), ("restic", restic)):
        if repos and kind not in archiver_types:
            raise UsageError(f"the {kind} archiver is not available", "reinstall kvmsnap")
        targets += [ArchiveTarget(kind if len(repos) == 1 else f"{kind}{i}", kind, mode,
                                  {"repository": absolute_repository(repo, Path.cwd())})
                    for i, repo in enumerate(repos)]
    return tuple(targets)


def luks_keys(value: Any, where: str) -> tuple[tuple[str, Path], ...]:
    """``{"UUID" = "/path"}`` (the config) or ``["UUID=/path"]`` (``--luks-key``): key files
    by LUKS UUID, each one a file that exists."""
    if isinstance(value, list | tuple):
        value = dict(str(v).partition("=")[::2] for v in value)
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()):
        raise UsageError(f"luks_keys in {where} must map LUKS UUIDs to key files, not "
                         f"{value!r}", 'e.g. luks_keys = {"UUID" = "/root/keys/data.key"} '
                         "or --luks-key UUID=FILE")
    for uuid, key in value.items():
        if not Path(key).is_file():
            raise UsageError(f"the key file {key} for LUKS volume {uuid} does not exist",
                             "give the path of a readable key file")
    return tuple((uuid.lower(), Path(key)) for uuid, key in value.items())
