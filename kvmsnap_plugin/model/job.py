"""A backup job, and what a run reports: the backup, a dry-run plan, a recovery, the
VM's record in every archive."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmsnap_plugin.errors import UsageError
from kvmsnap_plugin.model.defaults import (
    DEFAULT_LIBVIRT_URI,
    MAX_PAUSE,
    MIN_FREE,
    Label,
    RamMethod,
)
from kvmsnap_plugin.model.disks import (
    ArchiveResult,
    ArchiveTarget,
    PartitionRecord,
    SkipRule,
    TargetFailure,
    Verdict,
)
from kvmsnap_plugin.model.vm import (
    CloneBinary,
    Collapse,
    Commit,
    ShutdownPolicy,
    ShutdownResult,
)
from kvmsnap_plugin.paths import DEFAULT_WORKDIR

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ForkOptions:
    method: RamMethod = RamMethod.AUTO
    shutdown: ShutdownPolicy = field(default_factory=ShutdownPolicy)
    keep_dir: Path | None = None  # write the clone's disks out as standalone images here
    workdir: Path = DEFAULT_WORKDIR  # RAM state, clone overlays, mounts (0700)
    overlay_dir: Path | None = None  # the parent's temporary overlays (default: beside images)
    clone_console: Path | None = None  # capture the clone's first serial port (debugging)
    pid: int | None = None  # the QEMU process, if peer credentials cannot tell
    mount_root: Path | None = None  # where the clone's filesystems appear (default: workdir)
    #: rebuild the parent's guest RAM huge pages before the pause (see hugepages.py)
    collapse_huge_pages: bool = True
    #: bytes to leave free on the filesystems of the overlays and the work directory
    min_free: int = MIN_FREE
    #: the longest pause of the parent kvmsnap may cause (seconds); refused before pausing
    max_pause: float = MAX_PAUSE
    #: options of the parent's command line the clone leaves out (``set``,
    #: ``object:input-barrier``): ones kvmsnap would refuse, the operator knows to be the
    #: parent's alone
    clone_drop: tuple[str, ...] = ()
    #: accept a work directory on a network or FUSE filesystem (the guest's RAM goes there)
    allow_remote_workdir: bool = False
    #: partitions the operator knows to skip (``label:SWAP``, ``uuid:...``, ``type:...``):
    #: reported as skipped by config, no nightly warning
    skip_partitions: tuple[SkipRule, ...] = ()
    #: key files for the guest's LUKS volumes, by the volume's LUKS UUID (config
    #: ``luks_keys = {"UUID" = "/root/keys/data.key"}``, ``--luks-key UUID=FILE``)
    luks_keys: tuple[tuple[str, Path], ...] = ()
    #: seconds re-collapsing huge pages may take per fork; the rest of the RAM waits
    collapse_budget: float = 2.0

    def __post_init__(self) -> None:
        choices = [m.value for m in RamMethod if m is not RamMethod.OFFLINE]
        if self.method not in choices:
            raise UsageError(f"unknown RAM snapshot method {self.method!r}",
                             f"use one of: {', '.join(choices)}")
        object.__setattr__(self, "method", RamMethod(self.method))
        object.__setattr__(self, "clone_drop", tuple(_clone_drop(d) for d in self.clone_drop))
        object.__setattr__(self, "skip_partitions", tuple(
            r if isinstance(r, SkipRule) else SkipRule.parse(r) for r in self.skip_partitions))


def _clone_drop(name: object) -> str:
    """``-set`` -> ``set``; only an option or an ``object:TYPE``: dropping a
    device, a disk or a network backend would change the machine the RAM state fits."""
    text = str(name).lstrip("-") if isinstance(name, str) else ""
    if not re.fullmatch(r"(object:)?[A-Za-z0-9][\w.-]*", text):
        raise UsageError(f"cannot drop {name!r} from the clone: name an option "
                         "(set) or an object type (object:input-barrier)",
                         "devices, disks and network backends cannot be dropped: the "
                         "clone's machine must be the parent's")
    return text


@dataclass(frozen=True)
class VmCommands:
    """Commands run after one VM's backup, by its outcome (argv lists, never a shell; like
    vzdump's hook phases or borgmatic's ``after: error``): healthchecks, ntfy, mail."""

    on_success: tuple[str, ...] = ()
    on_warning: tuple[str, ...] = ()
    on_failure: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSettings:
    """What a run of many VMs shares: discovery, how many clones at once within the host's
    budget, and where monitoring reads the results (``[run]`` in the config)."""

    max_clones: int = 1  # clones alive at once (each needs its guest's RAM)
    min_free_ram: int = 0  # bytes of host RAM kept free besides the clones'
    metrics_file: Path | None = None  # node_exporter textfile-collector output
    all_domains: bool = False  # every running libvirt domain, besides the [[vm]] tables
    exclude: tuple[str, ...] = ()  # VM names or globs left out
    libvirt_uri: str = DEFAULT_LIBVIRT_URI

    def __post_init__(self) -> None:
        if not isinstance(self.max_clones, int) or self.max_clones < 1:
            raise UsageError(f"max_clones must be a whole number, at least 1, not "
                             f"{self.max_clones!r}", "pass --max-clones 1 or more "
                             "(max_clones = 2 in [run])")


@dataclass(frozen=True)
class BackupJob:
    """Everything needed to back up one VM."""

    name: str
    qmp: Path | None  # a bare QEMU's QMP socket, or None for a libvirt domain
    fork: ForkOptions = field(default_factory=ForkOptions)
    targets: tuple[ArchiveTarget, ...] = ()
    dry_run: bool = False
    domain: str | None = None  # a libvirt domain's name
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    commands: VmCommands = field(default_factory=VmCommands)
    #: False: ``name`` only stands in (the socket's path) until the VM is asked for its own
    #: (QEMU's -name, else its UUID, else the socket's stem) when its session opens
    name_given: bool = True
    #: ``verify = true``: boot the image archive this backup just made (run/verify.py)
    verify: VerifySettings = field(default_factory=lambda: VerifySettings())

    def named(self, name: str) -> BackupJob:
        """This job under the VM's own ``name``, unless one was given."""
        return self if self.name_given else replace(self, name=name, name_given=True)

    @property
    def identity(self) -> str:
        """What names this VM across runs (the journal and lock are keyed on it)."""
        if self.domain:
            return f"libvirt:{self.libvirt_uri}:{self.domain}"
        return os.path.realpath(self.qmp or "")


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackupReport:
    vm: str
    label: Label
    method: RamMethod
    pause_ms: float
    disk_snapshot_ms: float
    ram_bytes: int
    ram_save_s: float
    qemu_downtime_ms: int | None
    clone_restore_s: float
    shutdown: ShutdownResult
    verdicts: list[Verdict]
    archives: list[ArchiveResult]
    kept: list[str]
    commits: list[Commit]
    total_s: float
    warnings: list[str] = field(default_factory=list)
    huge_pages: Collapse | None = None  # with collapse_huge_pages: what re-collapsing did
    #: ... and what it did after the RAM snapshot (in the background, for the next backup)
    huge_pages_after: Collapse | None = None
    clone_binary: CloneBinary | None = None  # the QEMU the clone ran (None: no clone)
    #: every partition of every disk, with what was done to it
    partitions: list[PartitionRecord] = field(default_factory=list)
    #: targets that got no archive (the others were still attempted): exit code 2
    failed_targets: list[TargetFailure] = field(default_factory=list)
    #: ``verify = true``: what booting the image archive it made proved
    verified: VerifyReport | None = None

    @property
    def clean(self) -> bool:
        """The clone shut down, every archived filesystem is verdicted clean, and nothing
        that holds data was left out (what was skipped, by rule or config, holds none)."""
        return (self.label is Label.CLEAN and all(v.clean for v in self.verdicts)
                and not any(p.warns for p in self.partitions))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["clean"] = self.clean
        data["targets"] = [{"target": t, "status": "ok"} for t in
                           dict.fromkeys(a.target for a in self.archives)] + [
            {"target": f.target, "status": "error", "error": f.error, "fix": f.fix}
            for f in self.failed_targets]
        if self.clone_binary:
            data["clone_binary"]["summary"] = self.clone_binary.describe()
        return data


@dataclass(frozen=True)
class VmOutcome:
    """One VM's result in a run of many: what monitoring, notifications and ``--json`` see.
    Every VM of a run has one, whether its backup succeeded, warned, failed or was skipped."""

    vm: str
    exit_code: int  # the VM's own exit code (see the README's "Exit codes")
    started_at: float  # epoch seconds
    finished_at: float
    report: BackupReport | Plan | None = None  # None when the VM failed before a report
    error: str = ""  # one line, secrets masked (failures only)
    fix: str = ""  # how to fix it (failures only)

    @property
    def status(self) -> str:
        """ok | warning | skipped | error, from the exit code."""
        return {0: "ok", 1: "warning", 75: "skipped"}.get(self.exit_code, "error")

    def as_dict(self) -> dict[str, Any]:
        # the job's name wins over the report's (QEMU's -name, which VMs may share)
        data: dict[str, Any] = self.report.as_dict() if self.report is not None else {}
        data.update(vm=self.vm, status=self.status, exit_code=self.exit_code,
                    started_at=self.started_at, finished_at=self.finished_at)
        if self.error:
            data.update(error=self.error, fix=self.fix)
        return data


@dataclass(frozen=True)
class Plan:
    """What a backup would do (``--dry-run``): nothing is touched to make it."""

    vm: str
    pid: int
    disks: list[dict[str, str]]
    clone_argv: list[str]
    targets: list[str]
    mount_root: str
    clone_binary: str = ""  # the QEMU the clone would run, and how it would be confined

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Recovery:
    """What a recovery (or a release) did, for the report."""

    vm: str
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def did(self, action: str) -> None:
        log.info("%s: %s", self.vm, action)
        self.actions.append(action)

    def failed(self, problem: str) -> None:
        log.error("%s: %s", self.vm, problem)
        self.problems.append(problem)


@dataclass(frozen=True)
class RecordedDisk:
    device: str
    image: str  # the parent's image file at backup time
    format: str
    virtual_size: int
    #: a firmware flash (the UEFI variable store): restore it raw, boot it as pflash
    flash: bool = False


@dataclass(frozen=True)
class VmRecord:
    """``kvmsnap-vm.json``: what an archive says about the VM it came from."""

    vm: str
    run: str  # ties together the archives and snapshots of one backup
    taken_at: str  # when this record was written, seconds after the fork; ISO 8601 UTC
    label: str  # "clean" or "crash-consistent"
    method: str
    argv: list[str]
    disks: list[RecordedDisk]
    version: int = 1
    #: a libvirt domain's persistent XML at backup time ("" for a bare QEMU): what
    #: `kvmsnap restore --define` rewrites into the restored copy's definition
    domain_xml: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> VmRecord:
        data: dict[str, Any] = json.loads(text)
        data["disks"] = [RecordedDisk(**d) for d in data.get("disks", [])]
        return cls(**data)


# -- verify ---------------------------------------------------------------------------------
#: what shows a guest has booted to its prompt, when nothing else is configured
DEFAULT_VERIFY_CONSOLE = r"login: |Reached target .*(Multi-User|Graphical)|KVMSNAP-READY"
VERIFY_TIMEOUT = 600.0  # seconds for a restored guest to come up (TCG boots are slow)


@dataclass(frozen=True)
class VerifySettings:
    """How to prove a backup (``kvmsnap verify``, or ``verify = true`` after each backup):
    what shows the booted copy came up, and which files a files archive must hold."""

    enabled: bool = False  # ``verify = true``: right after each backup, on its image archive
    command: tuple[str, ...] = ()  # run through the guest agent; exit status 0: came up
    console: str = ""  # a regex a console line must match ("" and no command: the default)
    timeout: float = VERIFY_TIMEOUT
    files: tuple[str, ...] = ()  # marker files a files archive must hold (vdisk0/p1/etc/...)

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise UsageError(f"verify timeout {self.timeout:g} s is too small",
                             "give the guest time to boot, e.g. verify_timeout = 600")
        if self.console:
            try:
                re.compile(self.console)
            except re.error as exc:
                raise UsageError(f"verify_console {self.console!r} is no regex: {exc}",
                                 'write a Python regex, e.g. "login:|READY"') from None
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "files", tuple(f.strip("/") for f in self.files))


@dataclass
class VerifyReport:
    """What ``kvmsnap verify`` proved of one backup (seconds from the start of the boot)."""

    vm: str
    source: str  # REPO::ARCHIVE, or the restic repository and run
    mode: str  # "image" or "files"
    booted: bool = False
    came_up: bool = False
    shut_down_clean: bool = False
    booted_s: float | None = None
    came_up_s: float | None = None
    shut_down_s: float | None = None
    how: str = ""  # what proved it came up: "guest agent: ...", "console: ..."
    reason: str = ""  # one line: why it is not proven (empty when all is good)
    failed: bool = False  # it failed the verification: did not come up, files missing
    verdicts: list[Verdict] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # files mode: what was found
    materialised_bytes: int = 0  # the space the archive's images took (sparse)
    unverifiable: bool = False  # it could not be verified (QEMU did not start): exit 2
    label: str = "clean"  # the backup's, as recorded: "clean" or "crash-consistent"

    @property
    def status(self) -> str:
        """What a script tells apart (``--json``'s ``status``); the first that applies."""
        if self.unverifiable:
            return "unverifiable"
        image = self.mode == "image"
        for status, applies in (
                ("did-not-boot", image and not self.booted),
                ("did-not-come-up", image and not self.came_up),
                ("incomplete", self.failed),
                ("unclean-shutdown", image and not self.shut_down_clean),
                ("filesystem-not-clean", not all(v.clean for v in self.verdicts)),
                ("crash-consistent", self.label != "clean")):
            if applies:
                return status
        return "ok"

    @property
    def exit_code(self) -> int:
        """0: proven; 1: verified, and the backup is not proven (``status`` says why);
        2: it could not be verified."""
        return {"ok": 0, "unverifiable": 2}.get(self.status, 1)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(exit_code=self.exit_code, status=self.status)
        return data
