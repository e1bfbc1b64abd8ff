"""node_exporter textfile-collector metrics of a run of many VMs (``[run] metrics_file``)
and of ``kvmsnap verify``.

One series per VM (label ``vm``), rewritten after every run, atomically (a scrape never
sees half a file). What the file held for a VM this run left out (``--vm web``), a failed
VM's last success, and the last verification of a VM not verified now (a standalone
``kvmsnap verify`` writes only its VM's verification) are carried over from the previous
file: an alert on ``time() - kvmsnap_last_success_timestamp_seconds`` (or
``kvmsnap_last_verify_success_timestamp_seconds``) must not reset because one run failed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from kvmsnap_plugin.host import dirs
from kvmsnap_plugin.model import BackupReport, FsState, RunSettings, VerifyReport, VmOutcome

log = logging.getLogger(__name__)

#: name -> (help, labels besides ``vm``)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "kvmsnap_last_run_timestamp_seconds": (
        "When the VM's last backup ended (epoch seconds), whatever its result.", ()),
    "kvmsnap_last_success_timestamp_seconds": (
        "When the VM's last successful backup (exit code 0 or 1) ended (epoch seconds).", ()),
    "kvmsnap_exit_status": (
        "The VM's exit code in the last run: 0 ok, 1 warning, 2 error, 75 skipped.", ()),
    "kvmsnap_pause_milliseconds": (
        "How long the VM was paused for the fork, in the last backup.", ()),
    "kvmsnap_clone_shutdown_seconds": (
        "From the clone's power button to its end, in the last backup.", ()),
    "kvmsnap_backup_duration_seconds": (
        "How long the VM's last backup took, start to end.", ()),
    "kvmsnap_archive_bytes": (
        "Bytes of the last backup per archive target and content: kind=read (from the "
        "clone's disks) or kind=new (added to the repository).", ("archive", "content", "kind")),
    "kvmsnap_verdicts": (
        "Filesystems of the last backup by verdict (clean, needs-recovery, unknown).",
        ("verdict",)),
    "kvmsnap_verify_status": (
        "The VM's last verification (verify = true, or kvmsnap verify): 0 proven, 1 not "
        "proven (did not boot, did not come up, not clean, incomplete), 2 could not verify.",
        ()),
    "kvmsnap_verify_came_up_seconds": (
        "From the last verification's boot to the guest proven up.", ()),
    "kvmsnap_last_verify_timestamp_seconds": (
        "When the VM's last verification ended (epoch seconds), whatever its result.", ()),
    "kvmsnap_last_verify_success_timestamp_seconds": (
        "When a verification last proved a backup of the VM (exit code 0; epoch seconds).",
        ()),
}
LAST_SUCCESS = "kvmsnap_last_success_timestamp_seconds"
LAST_VERIFY = "kvmsnap_last_verify_timestamp_seconds"
LAST_VERIFY_SUCCESS = "kvmsnap_last_verify_success_timestamp_seconds"
#: a verification's families: replaced for the VMs verified, kept for the others (a backup
#: without ``verify = true`` leaves the last ``kvmsnap verify``'s series alone)
VERIFY_FAMILIES = ("kvmsnap_verify_status", "kvmsnap_verify_came_up_seconds", LAST_VERIFY)
#: kept until a new sample replaces them: a failed run must not reset an alert's clock
STICKY = (LAST_SUCCESS, LAST_VERIFY_SUCCESS)

Sample = tuple[dict[str, str], float]  # labels (vm first), value


def write_metrics(settings: RunSettings, outcomes: Sequence[VmOutcome]) -> Path | None:
    """Write the run's metrics to ``settings.metrics_file`` (None: no metrics wanted)."""
    if settings.metrics_file is None:
        return None
    samples = {name: list(series(name, outcomes)) for name in FAMILIES}
    return _merged_into(settings.metrics_file, samples, ran={o.vm for o in outcomes})


def write_verify_metrics(path: Path | None, report: VerifyReport,
                         finished_at: float) -> Path | None:
    """A ``kvmsnap verify``'s series of its VM into ``path``; every other series (other
    VMs', this VM's backups') stays as it was."""
    if path is None:
        return None
    samples = {name: list(verify_series(name, {"vm": report.vm}, report, finished_at))
               for name in FAMILIES}
    return _merged_into(path, samples, ran=set())


def _merged_into(path: Path, samples: dict[str, list[Sample]], ran: set[str]) -> Path:
    """``samples``, and what the previous file holds that they do not replace: the series
    of the VMs not in ``ran`` (no backup now), the verification of those not verified now,
    and a last success no new one replaced."""
    fresh = {name: {labels["vm"] for labels, _ in got} for name, got in samples.items()}

    def replaced(name: str, vm: str | None) -> bool:
        if name in STICKY:
            return vm in fresh[name]
        return vm in (fresh[LAST_VERIFY] if name in VERIFY_FAMILIES else ran)

    for name, old in read_metrics(path).items():
        samples[name] += [(labels, value) for labels, value in old
                          if not replaced(name, labels.get("vm"))]
    write_atomically(path, render(samples))
    return path


def series(name: str, outcomes: Iterable[VmOutcome]) -> Iterable[Sample]:
    """This run's samples of one family."""
    for outcome in outcomes:
        vm = {"vm": outcome.vm}
        if name in PER_VM:
            value = PER_VM[name](outcome)
            if value is not None:
                yield vm, value
        elif isinstance(outcome.report, BackupReport):
            yield from _report_series(name, vm, outcome.report)
            if outcome.report.verified is not None:  # verify = true
                yield from verify_series(name, vm, outcome.report.verified,
                                         outcome.finished_at)


def verify_series(name: str, vm: dict[str, str], report: VerifyReport,
                  finished_at: float) -> Iterable[Sample]:
    """A verification's sample of one family (none of the others)."""
    value = {"kvmsnap_verify_status": report.exit_code,
             "kvmsnap_verify_came_up_seconds": report.came_up_s,
             LAST_VERIFY: finished_at,
             LAST_VERIFY_SUCCESS: finished_at if report.exit_code == 0 else None}.get(name)
    if value is not None:
        yield vm, value


def _report_series(name: str, vm: dict[str, str], report: BackupReport) -> Iterable[Sample]:
    if name == "kvmsnap_pause_milliseconds":
        yield vm, report.pause_ms
    elif name == "kvmsnap_clone_shutdown_seconds" and report.shutdown.ended_by != "offline":
        yield vm, report.shutdown.seconds
    elif name == "kvmsnap_archive_bytes":
        for archive in report.archives:
            labels = {**vm, "archive": archive.target, "content": archive.kind}
            yield {**labels, "kind": "read"}, archive.bytes
            if archive.stored_bytes is not None:
                yield {**labels, "kind": "new"}, archive.stored_bytes
    elif name == "kvmsnap_verdicts":
        for state in FsState:
            yield ({**vm, "verdict": state.value},
                   sum(v.state is state for v in report.verdicts))


def succeeded(outcome: VmOutcome) -> bool:
    """A backup was made (a warning too: labelled, but archived); not a dry run's plan."""
    return outcome.exit_code in (0, 1) and isinstance(outcome.report, BackupReport)


#: the families every VM of a run has, failed or not (None: no sample)
PER_VM: dict[str, Callable[[VmOutcome], float | None]] = {
    "kvmsnap_last_run_timestamp_seconds": lambda o: o.finished_at,
    LAST_SUCCESS: lambda o: o.finished_at if succeeded(o) else None,
    "kvmsnap_exit_status": lambda o: o.exit_code,
    "kvmsnap_backup_duration_seconds": lambda o: o.finished_at - o.started_at,
}


class _Families:
    """A collector of fixed samples: what a registry asks to render them."""

    def __init__(self, samples: dict[str, list[Sample]]) -> None:
        self.samples = samples

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (text, extra) in FAMILIES.items():
            family = GaugeMetricFamily(name, text, labels=["vm", *extra])
            for labels, value in sorted(self.samples.get(name, []),
                                        key=lambda s: sorted(s[0].items())):
                family.add_metric([labels.get(k, "") for k in ("vm", *extra)], value)
            yield family


def render(samples: dict[str, list[Sample]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(samples))  # type: ignore[arg-type]
    return generate_latest(registry)


def read_metrics(path: Path) -> dict[str, list[Sample]]:
    """Our families in an earlier file (nothing when there is none, or it is unreadable)."""
    try:
        text = path.read_text()
        families = list(text_string_to_metric_families(text))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot read the previous metrics in %s (%s): starting afresh", path, exc)
        return {}
    return {f.name: [(dict(s.labels), s.value) for s in f.samples]
            for f in families if f.name in FAMILIES}


def write_atomically(path: Path, data: bytes) -> None:
    """Write, then rename into place: node_exporter reads either file whole (0644: it runs
    as its own user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with dirs.replacing(path) as temporary:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        temporary.chmod(0o644)
