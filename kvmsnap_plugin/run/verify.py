"""``kvmsnap verify``: boot a backup in a sandbox and prove it comes up.

An image archive's disks are materialised sparse in a private work directory
(run/verify_fetch.py) and booted on throw-away qcow2 overlays with the VM's recorded
command line, rewritten exactly as a clone's is (vm/clone_argv.py: network cut, consoles
captured or null, a private QMP, the guest agent's channel on a private socket, QEMU's
sandbox, the OOM killer's first choice), NICs unplugged before the guest runs. It came up
when the guest agent answers (and the configured command exits 0 through ``guest-exec``),
or when a console line matches the configured pattern (by default a login prompt or
systemd's multi-user target). Then the power button (vm/shutdown.py's ladder), the
filesystems' verdicts on the overlays (disks/, as after a backup), and everything is
deleted. A files archive is checked without extracting it (run/verify_files.py).

Exit codes: 0 proven; 1 the verification ran and the backup is not proven (it did not
boot, did not come up, did not shut down cleanly, a filesystem is not clean, it is
crash-consistent: ``VerifyReport.status`` says which); 2 it could not be verified (the
archive unreadable, QEMU did not start, a command and no guest agent to run it: an error).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kvmsnap_plugin.disks import classify, verify
from kvmsnap_plugin.disks.expose import exposed
from kvmsnap_plugin.errors import KvmsnapError, StepTimeout, UsageError, VMError
from kvmsnap_plugin.host import dirs, process
from kvmsnap_plugin.host.images import create_overlay
from kvmsnap_plugin.host.resources import make_oom_victim
from kvmsnap_plugin.model import (
    DEFAULT_NAME_TEMPLATE,
    BackupJob,
    BackupReport,
    CloneDisk,
    Mode,
    ParentDisk,
    ShutdownPolicy,
    VerifyReport,
    VerifySettings,
    VmRecord,
)
from kvmsnap_plugin.model.job import DEFAULT_VERIFY_CONSOLE
from kvmsnap_plugin.paths import DEFAULT_WORKDIR, safe_name, socket_dir
from kvmsnap_plugin.run.verify_fetch import Fetched, fetch_borg, fetch_restic, latest_borg_archive
from kvmsnap_plugin.run.verify_files import check_files
from kvmsnap_plugin.vm.clone import nic_names
from kvmsnap_plugin.vm.clone_argv import agent_chardev_ids, rewrite_argv
from kvmsnap_plugin.vm.clone_options import ClonePolicy
from kvmsnap_plugin.vm.clone_secrets import clone_master_key, master_key_of
from kvmsnap_plugin.vm.confine import SANDBOX, clone_env
from kvmsnap_plugin.vm.guest_agent import GuestAgent
from kvmsnap_plugin.vm.machine import Machine
from kvmsnap_plugin.vm.qemu_args import parse_argv
from kvmsnap_plugin.vm.qemu_help import binary_options
from kvmsnap_plugin.vm.shutdown import shut_down

log = logging.getLogger(__name__)

#: console lines that show a boot failed: reported at once, not after the timeout
BOOT_FAILED = re.compile(r"Kernel panic - not syncing[^\r\n]*|Failed to mount [^\r\n]*|"
                         r"ALERT! [^\r\n]*|Gave up waiting for root[^\r\n]*|"
                         r"You are in emergency mode[^\r\n]*|No bootable device[^\r\n]*")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def verify_borg(archive: str, settings: VerifySettings, workdir: Path = DEFAULT_WORKDIR,
                console_copy: Path | None = None) -> VerifyReport:
    """Verify ``REPO::ARCHIVE`` (an image or a files archive)."""
    return _verify(lambda work: fetch_borg(archive, work), settings, workdir, console_copy)


def verify_restic(repository: str, settings: VerifySettings, run: str | None = None,
                  vm: str | None = None, workdir: Path = DEFAULT_WORKDIR,
                  console_copy: Path | None = None) -> VerifyReport:
    """Verify one backup (``run``, default the latest, optionally of ``vm``): its image
    snapshots booted, or its files snapshot checked if it has no image."""
    return _verify(lambda work: fetch_restic(repository, work, run, vm), settings, workdir,
                   console_copy)


def verify_latest(job: BackupJob, settings: VerifySettings,
                  console_copy: Path | None = None) -> VerifyReport:
    """The latest backup of a configured VM (``kvmsnap verify --config``), from its first
    borg or restic target that archives images (else its first one: a files archive)."""
    targets = sorted((t for t in job.targets if t.type in ("borg", "restic")),
                     key=lambda t: t.mode == Mode.FILES)
    if not targets:
        raise UsageError(f"{job.name} has no borg or restic archiver to verify from",
                         "verify its archives with the tool that made them")
    target = targets[0]
    repository = str(target.option("repository", ""))
    if target.type == "restic":
        return verify_restic(repository, settings, vm=job.name, workdir=job.fork.workdir,
                             console_copy=console_copy)
    archive = latest_borg_archive(
        repository, target.option("archive_name", DEFAULT_NAME_TEMPLATE), job.name,
        "files" if target.mode == Mode.FILES else "image")
    return verify_borg(archive, settings, job.fork.workdir, console_copy)


def verify_backup(job: BackupJob, report: BackupReport) -> BackupReport:
    """``verify = true``: boot the image archive this backup just made; a backup that does
    not prove out is a warning (it exists, but may not restore), named in the report."""
    image = next((a for a in report.archives if a.kind == "image"
                  and a.type in ("borg", "restic")), None)
    if image is None:
        report.warnings.append("verify: this backup made no borg or restic image archive "
                               "to boot")
        return report
    target = next(t for t in job.targets if t.name == image.target)
    repository = str(target.option("repository", ""))
    try:
        if image.type == "borg":
            proved = verify_borg(f"{repository}::{image.name}", job.verify, job.fork.workdir)
        else:
            proved = verify_restic(repository, job.verify, vm=job.name,
                                   workdir=job.fork.workdir)
    except KvmsnapError as exc:  # the backup stands; only its proof failed
        report.warnings.append(f"verify: could not verify: {exc.one_line()}")
        return report
    if proved.exit_code:
        verdict = "could not verify" if proved.unverifiable else f"not proven ({proved.status})"
        report.warnings.append(f"verify: {verdict}: {proved.reason}")
    return replace(report, verified=proved)


def _verify(fetch: Callable[[Path], Fetched], settings: VerifySettings, workdir: Path,
            console_copy: Path | None) -> VerifyReport:
    dirs.private_dir(workdir, "the work directory")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="verify-") as tmp:
        work = Path(tmp)
        fetched = fetch(work)
        if fetched.mode == "files":
            return check_files(fetched, settings)
        report = VerifyReport(fetched.record.vm, fetched.source, "image",
                              materialised_bytes=fetched.allocated,
                              label=fetched.record.label)
        log.info("%s: %d disk(s) materialised, %.1f MiB on disk", fetched.source,
                 len(fetched.images), report.materialised_bytes / 2**20)
        overlays = _overlays(fetched, work)
        try:
            _boot(fetched.record, overlays, settings, work, report)
        finally:
            if console_copy and (work / "console.log").exists():
                shutil.copyfile(work / "console.log", console_copy)
        if report.booted:
            report.verdicts = _verdicts(overlays, work)
        if fetched.record.label != "clean" and not report.reason:
            report.reason = f"the backup is {fetched.record.label}: it booted, but was " \
                            "not shut down cleanly when it was taken"
    log.info("verified %s: %s", report.source, "ok" if report.exit_code == 0 else
             f"{report.status} (exit {report.exit_code}): {report.reason}")
    return report


def _overlays(fetched: Fetched, work: Path) -> list[CloneDisk]:
    overlays = []
    for disk in fetched.record.disks:
        raw = fetched.images[disk.device]
        overlay = work / f"verify-{safe_name(disk.device)}.qcow2"
        create_overlay(overlay, str(raw), "raw", raw.stat().st_size)
        overlays.append(CloneDisk(disk.device, overlay, raw, "raw"))
    return overlays


@dataclass(frozen=True)
class BootPlan:
    argv: list[str]
    qmp: Path
    console: Path
    agent: Path | None


def plan_boot(record: VmRecord, overlays: list[CloneDisk], work: Path,
              sockets: Path) -> BootPlan:
    """The recorded command line, rewritten as a clone's, booting (not loading RAM)."""
    program = _program(record.argv[0])
    known = binary_options(program)
    parents = [ParentDisk(d.device, "", d.image, d.format, d.virtual_size, False, (d.image,))
               for d in record.disks]
    qmp, console = sockets / "verify-qmp.sock", work / "console.log"
    agent = sockets / "verify-qga.sock" if agent_chardev_ids(record.argv) else None
    argv = rewrite_argv([program, *record.argv[1:]], parents, overlays, qmp, console,
                        workdir=work, agent_socket=agent, policy=ClonePolicy(known=known))
    if argv[-2:] == ["-incoming", "defer"]:  # a fresh boot: no RAM state to load
        argv = argv[:-2]
    if any(master_key_of(o.value or "") for o in parse_argv(record.argv)[1]
           if o.name == "object"):
        # libvirt's per-run key is long gone; the secrets it encrypted were not recorded
        # (redacted) either, so a fresh key serves what remains: QEMU's start.
        dirs.create_file(clone_master_key(work), os.urandom(32))
    if known and "sandbox" in known.with_value:
        argv += ["-sandbox", ",".join(["on", *(f"{k}={v}" for k, v in SANDBOX.items())])]
    return BootPlan(argv, qmp, console, agent)


def _program(recorded: str) -> str:
    """The recorded QEMU binary, or the one of that name on this host."""
    if os.path.isabs(recorded) and os.access(recorded, os.X_OK):
        return recorded
    return process.find_program(Path(recorded).name, "qemu-system-x86")


def _boot(record: VmRecord, overlays: list[CloneDisk], settings: VerifySettings,
          work: Path, report: VerifyReport) -> None:
    with socket_dir() as sockets:
        plan = plan_boot(record, overlays, work, sockets)
        if settings.command and plan.agent is None:  # nothing to prove it by: not its fault
            raise UsageError(f"the VM {record.vm} has no guest agent channel "
                             f"(org.qemu.guest_agent.0) to run {' '.join(settings.command)} "
                             "through", "prove it by its console: --console REGEX")
        machine = Machine(plan.argv, qmp_path=plan.qmp, name="verify", console_log=plan.console,
                          stderr_log=work / "verify.stderr", on_start=make_oom_victim,
                          env=clone_env(None))
        try:
            machine.start()
        except KvmsnapError as exc:
            report.reason = f"QEMU did not start: {exc.one_line()}"
            report.unverifiable = True
            return
        started = time.monotonic()
        try:
            for name in nic_names(machine):
                machine.qmp.execute("set_link", {"name": name, "up": False})
            watch = _Watch(machine, report, started)
            _wait_came_up(machine, plan, settings, watch)
            if report.came_up:
                result = shut_down(machine, ShutdownPolicy(timeout=settings.timeout),
                                   plan.agent)
                report.shut_down_clean = result.clean
                report.shut_down_s = round(time.monotonic() - started, 1)
                if not result.clean:
                    report.reason = f"it came up, but did not shut down cleanly ({result.reason})"
        finally:
            machine.shutdown(powerdown_timeout=0)


@dataclass
class _Watch:
    """Follows the console: when the guest first printed, and whether its boot failed."""

    machine: Machine
    report: VerifyReport
    started: float

    def console(self) -> str:
        return ANSI_ESCAPE.sub("", self.machine.console())

    def check(self) -> None:
        text = self.console()
        if text.strip() and not self.report.booted:
            self.mark_booted()
        failed = BOOT_FAILED.search(text)
        if failed:
            raise VMError(f"the boot failed: {failed.group(0).strip()}")
        if not self.machine.running():
            last = text.strip().splitlines()[-1:] or [self.machine.stderr_tail()]
            raise VMError(f"QEMU exited before the guest came up: {last[0].strip()}")

    def mark_booted(self) -> None:
        self.report.booted = True
        self.report.booted_s = round(time.monotonic() - self.started, 1)


def _wait_came_up(machine: Machine, plan: BootPlan, settings: VerifySettings,
                  watch: _Watch) -> None:
    report = watch.report
    deadline = watch.started + settings.timeout
    machine.qmp.execute("cont")
    try:
        if settings.command or (plan.agent and not settings.console):
            _by_agent(plan, settings, watch, deadline)
        else:
            pattern = re.compile(settings.console or DEFAULT_VERIFY_CONSOLE)
            while not (match := pattern.search(watch.console())):
                watch.check()
                if time.monotonic() > deadline:
                    raise StepTimeout(f"no console line matched {pattern.pattern!r}")
                time.sleep(0.2)
            report.how = f"console: {match.group(0).strip()}"
        if not report.booted:  # it came up before the console was first looked at
            watch.mark_booted()
        report.came_up = True
        report.came_up_s = round(time.monotonic() - watch.started, 1)
    except KvmsnapError as exc:
        report.failed = True
        report.reason = (f"did not come up within {settings.timeout:g} s: {exc}"
                         if isinstance(exc, StepTimeout) else str(exc))


def _by_agent(plan: BootPlan, settings: VerifySettings, watch: _Watch,
              deadline: float) -> None:
    assert plan.agent is not None  # _boot refused a command without an agent channel
    with GuestAgent(plan.agent) as agent:
        agent.wait_ready(deadline, watch.check)
        if not settings.command:
            watch.report.how = "guest agent: guest-ping answered"
            return
        code, out, err = agent.run(settings.command, max(1.0, deadline - time.monotonic()))
    shown = " ".join(settings.command)
    out = "\n".join(filter(None, (out.strip(), err.strip())))
    if code is None:
        raise StepTimeout(f"{shown} did not finish in the guest in time")
    if code != 0:
        raise VMError(f"{shown} exited {code} in the guest: {out.splitlines()[-1:] or ''}")
    watch.report.how = f"guest agent: {shown} exited 0 ({out.splitlines()[-1] if out else ''})"


def _verdicts(overlays: list[CloneDisk], work: Path):
    """The filesystems' verdicts on the booted (and shut down) overlays."""
    images = [(d.device, d.overlay, "qcow2") for d in overlays]
    with exposed(images, work, work / "mnt", mount=False) as exposure:
        return verify.verdicts(classify.to_verdict(exposure.filesystems, image_only=True))


def render(report: VerifyReport) -> str:
    """The report in a few lines."""
    def step(done: bool, seconds: float | None) -> str:
        return (f"yes ({seconds:g} s)" if seconds is not None else "yes") if done else "no"

    lines = [f"verify {report.vm} ({report.source}, {report.mode} backup):"]
    if report.mode == "image":
        lines += [f"  booted: {step(report.booted, report.booted_s)}",
                  f"  came up: {step(report.came_up, report.came_up_s)}"
                  + (f" by {report.how}" if report.how else ""),
                  f"  shut down clean: {step(report.shut_down_clean, report.shut_down_s)}"]
        lines += [f"  {v.where}: {v.fstype} {v.state.value} ({v.detail})"
                  for v in report.verdicts]
    lines += [f"  {line}" for line in report.checked]
    verdict = {0: "ok", 2: "COULD NOT VERIFY"}.get(report.exit_code,
                                                   f"NOT PROVEN ({report.status})")
    lines.append(f"result: {verdict}" + (f": {report.reason}" if report.reason else ""))
    return "\n".join(lines)
