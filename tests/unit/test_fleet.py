"""The run of many VMs (run/fleet.py) with fake jobs: how many at once, the host's budget,
independent results, the exit code's summary."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvmsnap_plugin.errors import ArchiveError, SkipBackup, VMError
from kvmsnap_plugin.host.resources import free_bytes
from kvmsnap_plugin.model import (
    BackupJob,
    BackupReport,
    Label,
    Plan,
    RamMethod,
    RunSettings,
    ShutdownResult,
    TargetFailure,
)
from kvmsnap_plugin.run import fleet
from kvmsnap_plugin.run.fleet import Need, run_fleet, summary_code

GIB = 1 << 30


def job(name: str) -> BackupJob:
    return BackupJob(name, None, domain=name)


def report(name: str, **fields) -> BackupReport:
    return BackupReport(name, Label.CLEAN, RamMethod.BACKGROUND, 1.0, 1.0, GIB, 1.0, 1, 1.0,
                        ShutdownResult(True, "guest", 1.0, 1, "guest-shutdown"), [], [], [],
                        [], 2.0, **fields)


class Recorder:
    """A fake backup: holds each VM for ``seconds`` and counts how many run at once."""

    def __init__(self, seconds: float = 0.05, fail: dict[str, Exception] | None = None):
        self.seconds, self.fail = seconds, fail or {}
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.order: list[str] = []

    def __call__(self, vm: BackupJob) -> BackupReport:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.order.append(vm.name)
        try:
            time.sleep(self.seconds)
            if vm.name in self.fail:
                raise self.fail[vm.name]
            return report(vm.name)
        finally:
            with self.lock:
                self.now -= 1


def needs(ram: dict[str, int]):
    return lambda vm: Need(ram.get(vm.name, GIB), Path("/w"), 0)


def budget(ram_total: int):
    """A host with ``ram_total`` bytes for clones: what runs counts as taken."""
    def fits(need: Need, running, min_free_ram: int) -> str | None:
        used = sum(n.ram for n in running)
        return None if used + need.ram + min_free_ram <= ram_total else "no room"
    return fits


def always(need, running, min_free_ram):
    return None


@pytest.mark.parametrize("max_clones", [1, 2, 3])
def test_never_more_than_max_clones_at_once(max_clones):
    run = Recorder()
    jobs = [job(f"vm{i}") for i in range(7)]
    outcomes = run_fleet(jobs, RunSettings(max_clones=max_clones), run,
                         measure=needs({}), fits=always)
    assert run.most == max_clones
    assert [o.vm for o in outcomes] == [j.name for j in jobs]  # in the jobs' order
    assert all(o.exit_code == 0 and o.report.vm == o.vm for o in outcomes)


def test_one_at_a_time_runs_in_the_calling_thread():
    threads = []

    def run(vm):
        threads.append(threading.current_thread())
        return report(vm.name)

    run_fleet([job("a"), job("b")], RunSettings(max_clones=1), run, measure=needs({}),
              fits=always)
    assert threads == [threading.main_thread()] * 2


def test_the_budget_holds_a_job_back_until_running_ones_finish():
    run = Recorder(seconds=0.1)
    # 3 GiB for clones: two 1 GiB VMs fit beside each other, the 2 GiB one only beside one
    ram = {"a": GIB, "b": GIB, "big": 2 * GIB, "c": GIB}
    outcomes = run_fleet([job(n) for n in ram], RunSettings(max_clones=4), run,
                         measure=needs(ram), fits=budget(3 * GIB))
    assert all(o.exit_code == 0 for o in outcomes)
    assert run.most <= 3 and run.most >= 2
    # whenever "big" ran, at most 1 GiB of others ran beside it: it waited for a and b
    starts = {o.vm: o.started_at for o in outcomes}
    ends = {o.vm: o.finished_at for o in outcomes}
    beside_big = [n for n in ram if n != "big" and starts[n] < ends["big"]
                  and ends[n] > starts["big"]]
    assert sum(ram[n] for n in beside_big) <= GIB


def test_min_free_ram_is_part_of_the_budget():
    run = Recorder()
    outcomes = run_fleet([job("a"), job("b")], RunSettings(max_clones=2, min_free_ram=GIB),
                         run, measure=needs({}), fits=budget(2 * GIB))
    assert run.most == 1 and all(o.exit_code == 0 for o in outcomes)


def test_a_job_that_never_fits_fails_alone_with_the_reason():
    run = Recorder()
    ram = {"a": GIB, "huge": 64 * GIB, "b": GIB}
    outcomes = run_fleet([job(n) for n in ram], RunSettings(max_clones=2), run,
                         measure=needs(ram), fits=budget(4 * GIB))
    by_vm = {o.vm: o for o in outcomes}
    assert by_vm["a"].exit_code == 0 and by_vm["b"].exit_code == 0
    assert by_vm["huge"].exit_code == 2 and by_vm["huge"].report is None
    assert "does not fit on this host even alone: no room" in by_vm["huge"].error
    assert by_vm["huge"].fix and "\n" not in by_vm["huge"].error
    assert "huge" not in run.order


def test_one_failure_does_not_stop_the_others_and_each_has_its_outcome():
    run = Recorder(fail={"b": VMError("b is not running", "start it"),
                         "c": RuntimeError("a bug"),
                         "d": SkipBackup("d: skipped by a plugin: busy")})
    names = ["a", "b", "c", "d", "e"]
    outcomes = run_fleet([job(n) for n in names], RunSettings(max_clones=2), run,
                         measure=needs({}), fits=always)
    assert sorted(run.order) == names  # every VM was attempted
    by_vm = {o.vm: o for o in outcomes}
    assert by_vm["a"].status == "ok" and by_vm["e"].status == "ok"
    assert (by_vm["b"].exit_code, by_vm["b"].error, by_vm["b"].fix) == (
        2, "b is not running", "start it")
    assert by_vm["c"].exit_code == 2 and "internal error: RuntimeError: a bug" in by_vm["c"].error
    assert by_vm["d"].status == "skipped" and by_vm["d"].exit_code == 75
    assert summary_code([o.exit_code for o in outcomes]) == 2
    assert all(o.finished_at >= o.started_at for o in outcomes)


def test_a_vm_whose_question_fails_fails_alone():
    def measure(vm):
        if vm.name == "gone":
            raise VMError("cannot connect to gone's QMP socket", "start it")
        return Need(GIB, Path("/w"), 0)

    outcomes = run_fleet([job("gone"), job("here")], RunSettings(max_clones=2), Recorder(),
                         measure=measure, fits=always)
    assert [o.status for o in outcomes] == ["error", "ok"]
    assert outcomes[0].error == "cannot connect to gone's QMP socket"


def test_secrets_in_errors_are_masked():
    run = Recorder(fail={"a": ArchiveError("cannot open sftp://me:hunter2@host/repo", "x")})
    outcome, = run_fleet([job("a")], RunSettings(), run)
    assert "hunter2" not in outcome.error and "sftp://me:***@host/repo" in outcome.error


def test_a_vm_listed_twice_fails_its_second_listing():
    outcomes = run_fleet([job("a"), job("a")], RunSettings(max_clones=2), Recorder(),
                         measure=needs({}), fits=always)
    assert [o.status for o in outcomes] == ["ok", "error"]
    assert "listed twice" in outcomes[1].error


def test_each_finished_vm_is_handed_to_the_callback_even_if_it_raises():
    seen = []

    def on_done(vm, outcome):
        seen.append((vm.name, outcome.status))
        raise RuntimeError("ntfy is down")

    run = Recorder(fail={"b": VMError("no", "fix")})
    outcomes = run_fleet([job("a"), job("b")], RunSettings(max_clones=2), run, on_done,
                         measure=needs({}), fits=always)
    assert sorted(seen) == [("a", "ok"), ("b", "error")]
    assert [o.status for o in outcomes] == ["ok", "error"]


def test_a_single_vm_is_not_asked_twice():
    """Alone, the VM's own run checks its room (check_room): no extra QMP session."""
    def measure(vm):
        raise AssertionError("measured")

    outcome, = run_fleet([job("a")], RunSettings(), Recorder(), measure=measure, fits=always)
    assert outcome.status == "ok"


def test_exit_codes_per_vm_and_their_summary():
    assert fleet.exit_code_of(report("a")) == 0
    assert fleet.exit_code_of(report("a", warnings=["vda/p1: log needs replay"])) == 1
    failed = report("a", failed_targets=[TargetFailure("offsite", "borg", "gone", "fix")])
    assert fleet.exit_code_of(failed) == 2  # a repository without this run's backup
    assert fleet.exit_code_of(Plan("a", 1, [], [], [], "/m")) == 0
    assert summary_code([0, 0]) == 0
    assert summary_code([0, 75]) == 75
    assert summary_code([0, 1, 75]) == 1
    assert summary_code([1, 2, 0]) == 2
    assert summary_code([0, 130]) == 130
    assert summary_code([]) == 0


def test_the_host_budget_counts_running_clones_and_ram_states(monkeypatch, tmp_path):
    monkeypatch.setattr(fleet, "available_memory", lambda: 8 * GIB)
    need = Need(2 * GIB, tmp_path, 0)
    assert fleet.host_fits(need, [], 0) is None
    # two running 2 GiB clones (+ QEMU's share each) leave no room for a third + 2 GiB kept
    reason = fleet.host_fits(need, [need, need], 2 * GIB)
    assert reason and "promised to running clones" in reason
    # space: the RAM states of the running ones are counted on the workdir's filesystem
    free = free_bytes(tmp_path)
    big = Need(free // 2, tmp_path, 0)
    monkeypatch.setattr(fleet, "available_memory", lambda: 1 << 60)
    assert fleet.host_fits(big, [], 0) is None
    assert "not enough free space" in fleet.host_fits(big, [big, big], 0)


def test_a_parent_stopping_interrupts_its_own_vm_not_the_run():
    """In a run of many, each VM runs in a thread: the watch over its parent ends that VM's
    step with the parent's error, and no SIGINT reaches the main thread (the whole run)."""
    from kvmsnap_plugin.errors import HostError
    from kvmsnap_plugin.run.watch import watching

    class Stopped:
        def check_healthy(self):
            raise HostError("web stopped on an I/O error during the backup", "free space")

    caught: list[BaseException] = []

    def step():
        try:
            with watching(Stopped(), every=0.05):
                for _ in range(200):  # a step that runs Python now and then (10 s in all)
                    time.sleep(0.05)
        except BaseException as exc:
            caught.append(exc)

    worker = threading.Thread(target=step)
    started = time.monotonic()
    worker.start()
    worker.join()  # a KeyboardInterrupt here would fail the test: the main thread was hit
    assert time.monotonic() - started < 5
    assert len(caught) == 1 and isinstance(caught[0], HostError), caught


def test_ctrl_c_unwinds_every_running_vm_then_ends_the_run():
    import signal

    cleaned, started = [], threading.Barrier(3)

    def run(vm):
        started.wait()
        try:
            for _ in range(200):
                time.sleep(0.05)
            return report(vm.name)
        finally:
            cleaned.append(vm.name)

    def ctrl_c():
        started.wait()
        time.sleep(0.3)  # both VMs are inside their step
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=ctrl_c).start()
    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_fleet([job("a"), job("b"), job("c")], RunSettings(max_clones=2), run,
                  measure=needs({}), fits=always)
    assert sorted(cleaned) == ["a", "b"]  # c never started; a and b ran their cleanup
    assert time.monotonic() - begun < 5


def test_a_vm_without_a_clone_takes_nothing_from_the_budget(monkeypatch, tmp_path):
    monkeypatch.setattr(fleet, "available_memory", lambda: 0)
    assert fleet.host_fits(Need(0, tmp_path, 1 << 60), [Need(GIB, tmp_path, 0)], GIB) is None


def test_a_parent_stopping_ends_the_program_its_vm_waits_for():
    """A VM's thread waiting for a quiet program (borg, restic) is not left waiting: the
    watch ends that program, and the VM's step ends with the parent's error."""
    from kvmsnap_plugin.errors import HostError
    from kvmsnap_plugin.host import process
    from kvmsnap_plugin.run.watch import watching

    class Stopped:
        def check_healthy(self):
            raise HostError("web stopped on an I/O error during the backup", "free space")

    caught: list[BaseException] = []
    other = []

    def step():
        try:
            with watching(Stopped(), every=0.1):
                process.run(["sleep", "60"], timeout=120)
        except BaseException as exc:
            caught.append(exc)

    def bystander():  # another VM's program: left alone
        other.append(process.run(["sleep", "1.5"], timeout=60).returncode)

    threads = [threading.Thread(target=step), threading.Thread(target=bystander)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    threads[0].join()
    assert time.monotonic() - started < 5
    assert len(caught) == 1 and isinstance(caught[0], HostError), caught
    threads[1].join()
    assert other == [0]


def test_a_vm_without_a_given_name_is_reported_and_logged_under_qemus_name():
    from kvmsnap_plugin.run.logs import current_vm, log_as_vm

    seen = []

    def named_by_qemu(vm: BackupJob) -> BackupReport:
        seen.append(current_vm.get())  # before QEMU is asked: the socket's stem
        log_as_vm("web")  # what the pipeline does once QEMU said its -name
        seen.append(current_vm.get())
        return report("web")

    unnamed = BackupJob("/run/vms/s/qmp.sock", Path("/run/vms/s/qmp.sock"), name_given=False)
    [outcome] = run_fleet([unnamed], RunSettings(), named_by_qemu)
    assert outcome.vm == "web" and outcome.as_dict()["vm"] == "web"
    assert seen == ["qmp", "web"] and current_vm.get() == ""  # restored after the VM


def test_naming_a_vm_outside_a_vm_context_leaks_into_nothing():
    from kvmsnap_plugin.run.logs import current_vm, log_as_vm

    log_as_vm("web")  # a pipeline called directly, not through the run of many
    assert current_vm.get() == ""


def test_a_skipped_vm_of_many_is_said_skipped_not_an_error(capsys):
    from kvmsnap_plugin.model import VmOutcome
    from kvmsnap_plugin.run.fleet import show_outcomes

    show_outcomes([VmOutcome("web", 75, 1.0, 2.0, error="web is not running", fix="none"),
                   VmOutcome("db", 2, 1.0, 2.0, error="db broke", fix="mend it")],
                  as_json=False)
    out, err = capsys.readouterr()
    assert err.splitlines() == ["kvmsnap: skipped: web: web is not running (fix: none)",
                                "kvmsnap: error: db: db broke (fix: mend it)"]
    assert out.splitlines() == ["web: SKIPPED", "db: FAILED"]
