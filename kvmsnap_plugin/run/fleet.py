"""Many VMs in one run: a bounded number at once, within the host's budget, each on its own.

A VM's backup holds a second copy of its guest's RAM (the clone) and writes its RAM state
into the work directory, so the run starts a VM only when the host has room for it beside
the ones already running: at most ``max_clones`` at once, host RAM (``MemAvailable``) for
its clone plus ``min_free_ram``, and free space for its RAM state (the same check, and
margin, as a single run's :func:`~kvmsnap_plugin.host.resources.check_space`). The budget
counts the running VMs' clones and RAM states as taken even before they exist (a clone
being loaded is not in ``MemAvailable`` yet): a conservative count, which may keep a VM
waiting a little longer, never one that oversubscribes. A VM that does not fit waits for
running ones to finish; one that does not fit with nothing running never will, and fails
alone with the reason.

Each VM's result is independent: whatever one raises, the others run, and every VM gets a
:class:`~kvmsnap_plugin.model.VmOutcome`. The VMs run in threads (the pipeline is blocking
I/O and subprocesses); with ``max_clones = 1`` they run one after another in the calling
thread, as a single VM always did (Ctrl-C and the parent watch interrupt it directly).
What concurrent runs must not share is checked per VM: the journal and lock (keyed on the
VM's identity: a VM listed twice is refused), the work directory (a fresh one per run),
the mount root (per VM name: names must differ), the run id (numbered per process).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmsnap_plugin.errors import HostError, KvmsnapError, SkipBackup, UsageError
from kvmsnap_plugin.host.resources import (
    QEMU_OVERHEAD,
    SpaceNeed,
    available_memory,
    check_space,
    human,
)
from kvmsnap_plugin.host.secrets import masked
from kvmsnap_plugin.model import BackupJob, BackupReport, Plan, RunSettings, VmOutcome
from kvmsnap_plugin.plugin.manager import Hooks
from kvmsnap_plugin.run.logs import vm_context
from kvmsnap_plugin.run.report import render_plan, render_report
from kvmsnap_plugin.run.watch import interrupt_thread

log = logging.getLogger(__name__)

EXIT_OK, EXIT_WARNING = 0, 1
EXIT_ERROR, EXIT_SKIP = KvmsnapError.exit_code, SkipBackup.exit_code
EXIT_INTERRUPTED = 130

#: one VM's backup (or its plan), and the exit code it earns
RunOne = Callable[[BackupJob], "BackupReport | Plan"]
#: called as each VM finishes (notifications, metrics); its errors are logged, not raised
Done = Callable[[BackupJob, VmOutcome], None]


@dataclass(frozen=True)
class Need:
    """What one VM's run takes from the host while it runs."""

    ram: int  # the guest's RAM: its clone takes as much, its RAM state as much on disk
    workdir: Path  # where the RAM state goes
    min_free: int  # the free-space margin the job keeps there


#: why ``need`` cannot start beside the ``running`` ones now, or None if it can
Fits = Callable[[Need, Sequence[Need], int], "str | None"]


def host_fits(need: Need, running: Sequence[Need], min_free_ram: int) -> str | None:
    """The host's budget: memory for every clone (the running ones counted as taken) and
    space for every RAM state, each filesystem keeping its margin. A VM without a clone
    (shut off, or a dry run) takes neither."""
    if not need.ram:
        return None
    taken = sum(n.ram + QEMU_OVERHEAD for n in running if n.ram)
    wanted = need.ram + QEMU_OVERHEAD + min_free_ram
    available = available_memory()
    if available - taken < wanted:
        return (f"not enough memory for its clone: {human(available)} available "
                f"(MemAvailable), {human(taken)} promised to running clones, "
                f"{human(wanted)} needed (guest RAM + QEMU + min_free_ram)")
    try:
        check_space([SpaceNeed(n.workdir, n.ram, "the RAM state", "--workdir")
                     for n in (need, *running)], need.min_free)
    except HostError as exc:
        return str(exc)
    return None


def measure_need(job: BackupJob) -> Need:
    """Ask the VM its RAM size (a shut-off VM, or a dry run, has no clone)."""
    from kvmsnap_plugin.fork.engine import open_parent
    from kvmsnap_plugin.fork.ram import guest_ram

    ram = 0
    if not job.dry_run:
        with open_parent(job) as handle:
            if handle.backend.online():
                ram = guest_ram(handle.backend.monitor)
    return Need(ram, job.fork.workdir, job.fork.min_free)


def exit_code_of(result: BackupReport | Plan) -> int:
    """0 clean; 1 a warning; 2 a target that got no archive (that repository has no
    backup of this run, even if another has one)."""
    if isinstance(result, Plan):
        return EXIT_OK
    if result.failed_targets:
        return EXIT_ERROR
    return EXIT_OK if result.clean and not result.warnings else EXIT_WARNING


def summary_code(codes: Sequence[int]) -> int:
    """The run's exit code: the worst of its VMs'. Error beats interrupted beats warning
    beats skip beats success."""
    for code in (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_WARNING, EXIT_SKIP):
        if code in codes:
            return code
    return EXIT_OK if all(c == EXIT_OK for c in codes) else EXIT_ERROR


def run_vm(job: BackupJob, run_one: RunOne) -> VmOutcome:
    """One VM's backup, whatever it raises, as its outcome (secrets masked)."""
    started = time.time()
    try:
        with vm_context(job.name if job.name_given else Path(job.name).stem):
            result = run_one(job)  # (every log line of this VM names it)
        # a VM without a given name is named by QEMU (its -name, else its UUID)
        name = job.name if job.name_given else result.vm
        return VmOutcome(name, exit_code_of(result), started, time.time(), result)
    except KvmsnapError as exc:
        log.debug("%s failed", job.name, exc_info=True)
        return failed(job, exc, started)
    except Exception as exc:  # a bug: the other VMs still run
        log.debug("%s failed", job.name, exc_info=True)
        return VmOutcome(job.name, EXIT_ERROR, started, time.time(),
                         error=masked(f"internal error: {type(exc).__name__}: {exc}"),
                         fix="run again with --debug and report the traceback")


def failed(job: BackupJob, exc: KvmsnapError, started: float | None = None) -> VmOutcome:
    now = time.time()
    return VmOutcome(job.name, exc.exit_code, started or now, now, error=masked(str(exc)),
                     fix=masked(exc.hint))


def run_fleet(jobs: Sequence[BackupJob], settings: RunSettings, run_one: RunOne,
              on_done: Done | None = None, *, measure: Callable[[BackupJob], Need] =
              measure_need, fits: Fits = host_fits) -> list[VmOutcome]:
    """Back up every job, at most ``settings.max_clones`` at once within the host's
    budget; every job gets an outcome, in the jobs' order."""
    fleet = _Fleet(settings, run_one, on_done, measure, fits)
    return fleet.run(list(jobs))


@dataclass
class _Item:
    index: int
    job: BackupJob
    need: Need | None = None
    thread: threading.Thread | None = None


@dataclass
class _Fleet:
    settings: RunSettings
    run_one: RunOne
    on_done: Done | None
    measure: Callable[[BackupJob], Need]
    fits: Fits
    outcomes: dict[int, VmOutcome] = field(default_factory=dict)
    running: dict[int, _Item] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)
    total: int = 0

    def run(self, jobs: list[BackupJob]) -> list[VmOutcome]:
        pending = self._refuse_twice(jobs)
        self.total = len(jobs)
        try:
            with self.changed:
                while pending or self.running:
                    pending = [item for item in pending if not self._try_start(item, pending)]
                    if pending or self.running:
                        self.changed.wait()
        except BaseException:  # Ctrl-C, SIGTERM: every running VM unwinds its own cleanup
            self._interrupt_all()
            raise
        return [self.outcomes[i] for i in range(len(jobs))]

    @property
    def _progress(self) -> int:
        """A line per VM start and end on stderr, for a run of many (one VM: its own
        messages say it all)."""
        return logging.INFO if self.total > 1 else logging.DEBUG

    def _refuse_twice(self, jobs: list[BackupJob]) -> list[_Item]:
        """A VM listed twice (same name, or the same VM under two names) would share its
        lock, journal and mount root: its second listing fails alone."""
        names: set[str] = set()
        identities: set[str] = set()
        pending = []
        for index, job in enumerate(jobs):
            if job.name in names or job.identity in identities:
                self.outcomes[index] = failed(job, UsageError(
                    f"{job.name} is listed twice in this run",
                    "give each VM one [[vm]] table (or exclude it from --all)"))
                continue
            names.add(job.name)
            identities.add(job.identity)
            pending.append(_Item(index, job))
        return pending

    def _try_start(self, item: _Item, pending: list[_Item]) -> bool:
        """Start ``item`` if it fits now (True); fail it alone if it never can (True);
        else leave it waiting (False). Called with the lock held."""
        if len(self.running) >= max(1, self.settings.max_clones):
            return False
        if self.total == 1:  # alone: the run checks its own room, as it always did
            item.need = Need(0, item.job.fork.workdir, 0)
        try:
            item.need = item.need or self.measure(item.job)
        except KvmsnapError as exc:
            self._finish(item, failed(item.job, exc))
            return True
        reason = self.fits(item.need, [i.need for i in self.running.values() if i.need],
                           self.settings.min_free_ram)
        if reason and not self.running:  # nothing to wait for: it never fits
            self._finish(item, failed(item.job, HostError(
                f"{item.job.name} does not fit on this host even alone: {reason}",
                "free memory or space, lower min_free_ram, or back it up on its own")))
            return True
        if reason:
            log.debug("%s waits: %s", item.job.name, reason)
            return False
        self._start(item)
        return True

    def _start(self, item: _Item) -> None:
        self.running[item.index] = item
        log.log(self._progress, "[%d/%d] %s: started (%d running)", item.index + 1,
                self.total, item.job.name, len(self.running))
        if self.settings.max_clones <= 1:  # one at a time: in this thread, as ever
            self.changed.release()
            try:
                self._work(item)
            finally:
                self.changed.acquire()
            return
        item.thread = threading.Thread(target=self._work, args=(item,),
                                       name=f"vm:{item.job.name}", daemon=False)
        item.thread.start()

    def _work(self, item: _Item) -> None:
        outcome = None
        try:
            outcome = run_vm(item.job, self.run_one)
        except KeyboardInterrupt:
            if item.thread is None:
                raise  # in the calling thread: the run ends, as a single VM's would
            outcome = replace(failed(item.job, KvmsnapError(
                "interrupted; its cleanup ran", "run the backup again")),
                exit_code=EXIT_INTERRUPTED)
        finally:
            if outcome is not None:
                self._finish(item, outcome)  # outside the lock: notifications take time
            with self.changed:
                self.running.pop(item.index, None)
                self.changed.notify_all()

    def _finish(self, item: _Item, outcome: VmOutcome) -> None:
        self.outcomes[item.index] = outcome  # one key per thread: no lock needed
        seconds = outcome.finished_at - outcome.started_at
        what = f"{outcome.status} in {seconds:.1f} s"
        if outcome.error:
            what += f": {outcome.error}"
        log.log(self._progress, "[%d/%d] %s: %s", item.index + 1, self.total, item.job.name,
                what)
        if self.on_done:
            try:
                self.on_done(item.job, outcome)
            except Exception as exc:  # a notification must not fail the backups
                log.error("%s: after-VM actions failed: %s", item.job.name, masked(str(exc)))

    def _interrupt_all(self) -> None:
        with self.changed:
            threads = [i.thread for i in self.running.values() if i.thread]
        for thread in threads:
            interrupt_thread(thread)
        for thread in threads:
            thread.join()


def backup_or_plan(hooks: Hooks | None) -> RunOne:
    """What a run does to each VM: back it up, or with --dry-run show its plan."""
    def run_one(job: BackupJob) -> BackupReport | Plan:
        from kvmsnap_plugin.run.pipeline import backup, plan
        from kvmsnap_plugin.run.verify import verify_backup

        if job.dry_run:
            return plan(job)
        report = backup(job, hooks)
        return verify_backup(job, report) if job.verify.enabled else report
    return run_one


def show_outcomes(outcomes: Sequence[VmOutcome], as_json: bool) -> None:
    """Stdout: each VM's report (or FAILED), or with ``as_json`` the outcomes (one VM: its
    object, as a single backup always printed; many: the list). Stderr: one error line
    per VM that failed or whose archive target failed (named when there are many)."""
    for outcome in outcomes:
        _print_error(outcome, named=len(outcomes) > 1)
    if as_json:
        shown = [o.as_dict() for o in outcomes]
        print(json.dumps(shown[0] if len(shown) == 1 else shown, indent=2, default=str))
    else:
        # each under the job's name (QEMU's -name, in the report, may be shared)
        print("\n".join(_render(replace(o.report, vm=o.vm)) if o.report else
                        f"{o.vm}: {o.status.upper() if o.status == 'skipped' else 'FAILED'}"
                        for o in outcomes))


def _print_error(outcome: VmOutcome, named: bool) -> None:
    failures = getattr(outcome.report, "failed_targets", [])
    if outcome.error:
        line = f"{outcome.error} (fix: {outcome.fix})"
    elif failures:
        line = (f"{len(failures)} archive target(s) got no archive: {failures[0].target}: "
                f"{failures[0].error} (fix: {failures[0].fix})")
    else:
        return
    kind = "skipped" if outcome.status == "skipped" else "error"  # a skip is no failure
    print(f"kvmsnap: {kind}: {outcome.vm + ': ' if named else ''}{masked(line)}",
          file=sys.stderr)


def _render(result: BackupReport | Plan) -> str:
    return render_plan(result) if isinstance(result, Plan) else render_report(result)
