"""The configuration's tables as pydantic models: every key's type, range and meaning.

pydantic v2 rather than msgspec: its errors carry the failing key's location and the
field's declared description, which turn into one-line messages naming the key and the
expected type (see :mod:`kvmsnap_plugin.config.messages`).

Models are strict (a string is never a number, a list never a string split into characters)
and forbid unknown keys. Every key defaults to ``None``, meaning "not set here": tables are
merged by the keys they set (``exclude_unset``), and whatever no table sets takes the
model's default (:mod:`kvmsnap_plugin.model`), kept in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, create_model

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.host.resources import parse_size
from kvmsnap_plugin.model import ForkOptions, Mode, OnUnclean, RamMethod, SkipRule

METHODS = tuple(m.value for m in RamMethod if m is not RamMethod.OFFLINE)
MODES = tuple(m.value for m in Mode)
POLICIES = tuple(o.value for o in OnUnclean)
SIZE = 'a size such as "1G", "512M", or a number of bytes'
ARGV = "a command as a list of strings (argv, no shell)"


class ModelError(ValueError):
    """A model constructor refused a value: its own message and fix are the best ones."""

    def __init__(self, error: UsageError) -> None:
        super().__init__(str(error))
        self.error = error


def via(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A validator from a model parser that raises UsageError."""
    def validate(value: Any) -> Any:
        try:
            check(value)
        except UsageError as exc:
            raise ModelError(exc) from None
        return value
    return validate


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(SIZE)
    try:
        size = parse_size(value)
    except UsageError:
        raise ValueError(SIZE) from None
    if size < 0:
        raise ValueError(SIZE)
    return size


def _key_files_exist(keys: dict[str, str]) -> None:
    for uuid, file in keys.items():
        if not Path(file).is_file():
            raise UsageError(f"the key file {file} of LUKS volume {uuid} does not exist",
                             "give the path of a readable key file")


def key(expected: str, example: Any, **constraints: Any) -> Any:
    """A key that may be left out; ``expected`` and ``example`` word its error message."""
    return Field(None, description=expected, examples=[example], **constraints)


Text = Annotated[str, Field(min_length=1)]
Size = Annotated[int, PlainValidator(_size)]
Argv = Annotated[list[Text], Field(min_length=1)]


class Table(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    #: how messages name the table
    title: ClassVar[str] = ""

    def settings(self) -> dict[str, Any]:
        """The keys this table sets."""
        return self.model_dump(exclude_unset=True)


class RunKeys(Table):
    """Keys of ``[defaults]`` that each ``[[vm]]`` may override (and the command line)."""

    method: Literal[METHODS] | None = key(" or ".join(METHODS), "auto")
    mode: Literal[MODES] | None = key(" or ".join(MODES), "files")
    workdir: Text | None = key("a directory path", "/var/tmp/kvmsnap")
    overlay_dir: Text | None = key("a directory path", "/var/lib/kvmsnap/overlays")
    keep: Text | None = key("a directory path", "/srv/clean-images")
    mount_root: Text | None = key("a directory path", "/var/tmp/kvmsnap/mnt/web")
    shutdown_timeout: float | None = key("a number of seconds, at least 1", 300, ge=1)
    repress_after: float | None = key("a number of seconds", 60, ge=0)
    on_unclean: Literal[POLICIES] | None = key(" or ".join(POLICIES), "fail")
    collapse_huge_pages: bool | None = key("true or false", True)
    min_free: Size | None = key(SIZE, "1G")
    max_pause: float | None = key("a number of seconds above 0", 5, gt=0)
    clone_drop: Annotated[list[str], AfterValidator(
        via(lambda names: ForkOptions(clone_drop=tuple(names))))] | None = key(
        'a list of option names ("set") or object types ("object:input-barrier")', ["set"])
    allow_remote_workdir: bool | None = key("true or false", True)
    skip_partitions: Annotated[list[str], AfterValidator(
        via(lambda rules: [SkipRule.parse(r) for r in rules]))] | None = key(
        "a list of rules such as label:NAME, uuid:UUID, type:KIND, where:DISK/pN",
        ["label:SWAP"])
    luks_keys: Annotated[dict[str, Text], AfterValidator(via(_key_files_exist))] | None = key(
        "a table of LUKS UUID = key file path", {"UUID": "/root/keys/data.key"})
    collapse_budget: float | None = key("a number of seconds above 0", 2, gt=0)
    # commands run after a VM's backup, by outcome (model.VmCommands)
    on_success: Argv | None = key(ARGV, ["curl", "-fsS", "https://hc.example/UUID"])
    on_warning: Argv | None = key(ARGV, ["curl", "-fsS", "https://hc.example/UUID/log"])
    on_failure: Argv | None = key(ARGV, ["curl", "-fsS", "https://hc.example/UUID/fail"])
    # boot each backup's image archive right after it is made (model.VerifySettings)
    verify: bool | None = key("true or false", True)
    verify_command: Argv | None = key(ARGV, ["systemctl", "is-system-running", "--wait"])
    verify_console: Text | None = key("a regex", "login:|KVMSNAP-READY")
    verify_timeout: float | None = key("a number of seconds above 0", 600, gt=0)
    verify_files: list[Text] | None = key("a list of paths in the files archive",
                                          ["vdisk0/p1/etc/hostname"])


class Defaults(RunKeys):
    title = "[defaults]"


class VmTable(RunKeys):
    """One ``[[vm]]``: the run keys, and which VM and where its disks go."""

    name: Text | None = key("a name", "web")
    qmp: Text | None = key("a QMP socket path", "/run/qemu/web.qmp")
    domain: Text | None = key("a libvirt domain name", "web")
    libvirt_uri: Text | None = key("a libvirt URI", "qemu:///system")
    pid: int | None = key("a process id", 4242, ge=1)
    archivers: list[Text] | None = key("a list of [archiver.NAME] names", ["local-borg"])


class RunTable(Table):
    """``[run]``: what a run of many VMs shares (model.RunSettings)."""

    title = "[run]"
    max_clones: int | None = key("a whole number, at least 1", 2, ge=1)
    min_free_ram: Size | None = key(SIZE, "2G")
    metrics_file: Text | None = key("a file path",
                                    "/var/lib/node_exporter/textfile/kvmsnap.prom")
    all_domains: bool | None = key("true or false", True)
    exclude: list[Text] | None = key("a list of VM names or globs", ["test-*"])
    libvirt_uri: Text | None = key("a libvirt URI", "qemu:///system")


class ArchiverTable(Table):
    """What every ``[archiver.NAME]`` has; each type adds its own keys."""

    type: Text = Field(description="an archiver type", examples=["borg"])
    env: dict[str, str] | None = key("a table of strings",
                                     {"BORG_PASSCOMMAND": "cat /root/.borg-passphrase"})
    archive_name: Text | None = key("a name template", "{vm}-{now:%Y-%m-%dT%H:%M:%S}")
    extra_args: list[str] | None = key("a list of strings", ["--exclude-caches"])


#: the built-in archivers' keys, typed; a plugin's keys (known by name only) take any value
TYPED_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "borg": {
        "repository": (Text | None, key("a repository path or URL", "/srv/backup/borg")),
        "compression": (Text | None, key("a borg compression spec", "zstd,3")),
        "chunker_params": (Text | None, key("borg chunker params", "fixed,4194304")),
        "timeout": (float | None, key("a number of seconds above 0", 86400, gt=0)),
    },
    "restic": {
        "repository": (Text | None, key("a repository path or URL", "/srv/backup/restic")),
        "tags": (list[Text] | None, key("a list of strings", ["nightly"])),
        "host": (Text | None, key("a host name", "web")),
        "timeout": (float | None, key("a number of seconds above 0", 86400, gt=0)),
        "options": (list[Text] | None, key("a list of restic -o KEY=VALUE options",
                                           ["sftp.command=ssh -F /root/.ssh/offsite offsite "
                                            "-s sftp"])),
    },
}


@functools.cache
def archiver_model(kind: str, keys: frozenset[str]) -> type[ArchiverTable]:
    """The table of archiver type ``kind``, whose plugin declared ``keys``."""
    typed = TYPED_OPTIONS.get(kind, {})
    fields: dict[str, Any] = {k: typed.get(k, (Any, key("a value", "..."))) for k in keys}
    return create_model(f"{kind.title()}ArchiverTable", __base__=ArchiverTable, **fields)
