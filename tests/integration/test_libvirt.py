"""libvirt domains through the same pipeline: libvirt's view stays right, the clone is clean.

Needs a real libvirtd (started by the session if none runs, see libvirt_fixtures.py) and
libvirt-python: these tests fail, never skip, without them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmsnap_demo.disk import read_disk
from kvmsnap_plugin import hookimpl
from kvmsnap_plugin.backends.libvirt import LibvirtBackend
from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.fork.engine import ParentHandle, plan_fork
from kvmsnap_plugin.fork.recovery import give_back
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import (
    ArchiveTarget,
    BackupJob,
    ForkOptions,
    FsState,
    JournalState,
    Recovery,
)
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.journal import state_dir
from kvmsnap_plugin.run.pipeline import backup

if TYPE_CHECKING:
    from libvirt_fixtures import Domain

pytestmark = pytest.mark.qemu
pytest_plugins = ["libvirt_fixtures"]  # the libvirtd and start_domain fixtures


def run(domain: Domain, tmp_path: Path, *targets: ArchiveTarget, plugins: tuple = (),
        **options) -> object:
    options.setdefault("workdir", tmp_path / "work")
    job = BackupJob(domain.name, None, ForkOptions(**options), tuple(targets),
                    domain=domain.name, libvirt_uri=domain.uri)
    return backup(job, Hooks(plugin_manager(list(plugins), entry_points=False)))


def stopped_at(text: str) -> int:
    return int(re.search(r"KVMSNAP-WORKLOAD-STOPPED (\d+)", text).group(1))


def leftover_overlays(domain: Domain) -> list[Path]:
    return [p for d in domain.disks for p in d.parent.glob("*.kvmsnap-*")]


@pytest.mark.parametrize("method", ["background-snapshot", "stop-and-copy"])
def test_domain_fork_is_clean_and_libvirt_keeps_the_right_view(start_domain, tmp_path,
                                                               method):
    domain = start_domain()
    blklist = domain.blklist()
    before = domain.wait_counter(10)
    report = run(domain, tmp_path, method=method, keep_dir=tmp_path / "keep",
                 clone_console=tmp_path / "clone.log")
    assert report.method == method and report.clean
    assert [(v.disk, v.state) for v in report.verdicts] == [("vda", FsState.CLEAN)]
    assert 0 < report.pause_ms < 2000  # generous for TCG on a loaded machine
    # The clone's disk: every line written before the fork, continuous, and the marker.
    clone = read_disk(Path(report.kept[0]), tmp_path / "kept.raw")
    last = stopped_at((tmp_path / "clone.log").read_text())
    assert clone.state is FsState.CLEAN and clone.continuous
    assert len(clone.lines) == last >= before
    assert clone.marker == f"clean shutdown after line {last}"
    # libvirt's view: the original chain, live and persistent, no snapshot metadata.
    assert domain.blklist() == blklist == [("vda", str(domain.disks[0]))]
    assert domain.inactive_sources() == [str(domain.disks[0])]
    assert domain.virsh("snapshot-list", "--name", domain.name).strip() == ""
    assert domain.state() == "running" and not leftover_overlays(domain)
    assert domain.wait_counter(domain.counter() + 3) > before  # the workload goes on
    # ...and libvirt can still change the chain itself.
    overlay = tmp_path / "later.qcow2"
    domain.virsh("snapshot-create-as", domain.name, "--disk-only", "--no-metadata",
                 "--atomic", "--diskspec", f"vda,file={overlay}")
    assert domain.blklist() == [("vda", str(overlay))]
    domain.virsh("blockcommit", domain.name, "vda", "--active", "--pivot", "--wait",
                 "--base", str(domain.disks[0]))
    assert domain.blklist() == blklist


def test_backup_into_borg_end_to_end(start_domain, tmp_path, borg_repo):
    domain = start_domain()
    before = domain.wait_counter(10)
    report = run(domain, tmp_path, ArchiveTarget("borg", "borg", "files",
                                                 {"repository": str(borg_repo)}),
                 collapse_huge_pages=True)
    assert report.clean and [a.kind for a in report.archives] == ["files"]
    # The QEMU libvirt started is found by its guest RAM mappings too.
    assert report.huge_pages and report.huge_pages.share_after > 0.5, report.huge_pages
    borg = process.find_program("borg", "borgbackup")
    names = [a["name"] for a in json.loads(process.run(
        [borg, "list", "--json", borg_repo], timeout=120).stdout)["archives"]]
    assert names == [report.archives[0].name]
    out = tmp_path / "extract"
    out.mkdir()
    process.run([borg, "extract", f"{borg_repo}::{names[0]}"], timeout=300, cwd=out)
    lines = (out / "vda" / "workload.log").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(1, len(lines) + 1)] and len(lines) >= before
    assert (out / "vda" / "clean-shutdown").read_text().strip() == \
        f"clean shutdown after line {len(lines)}"
    assert domain.state() == "running" and domain.blklist() == [("vda", str(domain.disks[0]))]


def test_a_domain_that_does_not_exist_is_one_clear_error(libvirtd, tmp_path):
    job = BackupJob("ghost", None, ForkOptions(workdir=tmp_path / "work"),
                    domain="kvmsnap-no-such-domain", libvirt_uri=libvirtd)
    with pytest.raises(VMError, match="no libvirt domain named 'kvmsnap-no-such-domain'") \
            as info:
        backup(job)
    assert f"virsh -c {libvirtd} list --all" in info.value.hint
    assert "\n" not in info.value.one_line()


def test_a_shut_off_domain_is_backed_up_offline_without_a_fork(start_domain, tmp_path):
    domain = start_domain()
    domain.wait_counter(5)
    domain.shut_down()  # the guest unmounts cleanly: its image is consistent as it is
    last = stopped_at(domain.console_text())
    report = run(domain, tmp_path, keep_dir=tmp_path / "keep")
    assert report.method == "offline" and report.pause_ms == 0 and report.clean
    assert [(v.disk, v.state) for v in report.verdicts] == [("vda", FsState.CLEAN)]
    kept = read_disk(Path(report.kept[0]), tmp_path / "kept.raw")
    assert len(kept.lines) == last and kept.marker == f"clean shutdown after line {last}"
    assert domain.state() == "shut off" and domain.inactive_sources() == [str(domain.disks[0])]
    assert not leftover_overlays(domain)


def fork_only(domain: Domain, tmp_path: Path):
    """Fork the domain through the backend and stop there, as a crash would."""
    state = tmp_path / "run"
    state.mkdir()
    with ParentHandle(LibvirtBackend(domain.name, domain.uri)) as backend:
        parent = backend.describe()
        planned = plan_fork(parent, "crash", None)
        point = backend.fork(parent, planned, state / "ram.state", "auto")
        fields = backend.journal_fields()
    return point, {**fields, "phase": "forked"}


def restore(data: dict, disks: list, result: Recovery) -> None:
    """Recovery of the parent, from a journal with these fields and overlays."""
    give_back(JournalState.from_dict({**data, "overlays": [d.as_dict() for d in disks]}),
              result)


def test_recovery_commits_a_running_domain_back_online(start_domain, tmp_path):
    domain = start_domain(disks=2)
    domain.wait_counter(5)
    point, data = fork_only(domain, tmp_path)
    assert [t for t, _ in domain.blklist()] == ["vda", "vdb"]
    assert [s for _, s in domain.blklist()] == [str(d.parent_overlay) for d in point.disks]
    result = Recovery(domain.name)
    restore(data, list(point.disks), result)
    assert not result.problems
    assert domain.blklist() == [("vda", str(domain.disks[0])), ("vdb", str(domain.disks[1]))]
    assert domain.inactive_sources() == [str(d) for d in domain.disks]
    assert not leftover_overlays(domain) and domain.state() == "running"
    restore(data, list(point.disks), Recovery(domain.name))  # idempotent: nothing left to do


def test_recovery_resumes_a_domain_our_fork_left_paused(start_domain, tmp_path):
    domain = start_domain()
    domain.wait_counter(3)
    with ParentHandle(LibvirtBackend(domain.name, domain.uri)) as backend:
        parent = backend.describe()
        planned = plan_fork(parent, "crash", None)
        data = {**backend.journal_fields(), "phase": "forking"}
    domain.dom.suspend()  # as if killed between the pause and the disk snapshot
    result = Recovery(domain.name)
    restore(data, list(planned), result)
    assert domain.state() == "running"
    assert any("resumed" in action for action in result.actions)
    assert domain.blklist() == [("vda", str(domain.disks[0]))]


def test_recovery_of_a_domain_gone_commits_offline_and_fixes_its_definition(start_domain,
                                                                            tmp_path):
    domain = start_domain()
    domain.wait_counter(5)
    point, data = fork_only(domain, tmp_path)
    domain.wait_counter(domain.counter() + 5)  # writes that only the overlay holds
    domain.shut_down()  # the guest unmounts cleanly, writing its last lines to the overlay
    last = stopped_at(domain.console_text())
    assert domain.inactive_sources() == [str(point.disks[0].parent_overlay)]
    result = Recovery(domain.name)
    restore(data, list(point.disks), result)
    assert not result.problems
    assert domain.inactive_sources() == [str(domain.disks[0])]
    assert not leftover_overlays(domain)
    disk = read_disk(domain.disks[0], tmp_path / "disk.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) == last
    domain.console.rename(tmp_path / "first-boot.log")
    domain.dom.create()  # and it starts again from its own image
    domain.wait_console("KVMSNAP-READY", 60)


class AdminSnapshot:
    """libvirt takes an external disk snapshot on top of kvmsnap's overlay mid-backup."""

    def __init__(self, domain: Domain, overlay: Path) -> None:
        self.domain = domain
        self.overlay = overlay

    @hookimpl
    def kvmsnap_post_shutdown(self):
        self.domain.virsh("snapshot-create-as", self.domain.name, "--disk-only",
                          "--no-metadata", "--atomic", "--diskspec", f"vda,file={self.overlay}")
        self.domain.wait_counter(self.domain.counter() + 3)


def test_a_snapshot_on_top_of_our_overlay_is_committed_through_the_middle(start_domain,
                                                                          tmp_path):
    domain = start_domain()
    before = domain.wait_counter(5)
    admin = tmp_path / "admin.qcow2"
    report = run(domain, tmp_path, plugins=(AdminSnapshot(domain, admin),))
    assert report.clean and [c.layer for c in report.commits] == ["below"]
    assert domain.blklist() == [("vda", str(admin))]  # backed by the image itself now
    assert domain.state() == "running" and not leftover_overlays(domain)
    domain.wait_counter(domain.counter() + 3)
    domain.shut_down()
    last = stopped_at(domain.console_text())
    disk = read_disk(admin, tmp_path / "after.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) == last > before


def test_a_managed_saved_domain_is_not_taken_for_shut_off(start_domain, tmp_path):
    domain = start_domain()
    domain.wait_counter(5)
    point, data = fork_only(domain, tmp_path)
    domain.wait_counter(domain.counter() + 3)
    domain.virsh("managedsave", domain.name)  # not running, yet it runs on the overlay
    with pytest.raises(VMError, match=r"not shut off but managed-saved .*: its overlays hold "
                                      "writes it still needs and are kept"):
        restore(data, list(point.disks), Recovery(domain.name))
    assert all(d.parent_overlay.exists() for d in point.disks)
    with pytest.raises(VMError, match="not shut off but managed-saved"):
        run(domain, tmp_path)  # nor backed up as if its images were at rest
    domain.dom.create()  # resumes from its memory image, on the overlay
    result = Recovery(domain.name)
    restore(data, list(point.disks), result)  # now committed back while it runs
    assert not result.problems and domain.blklist() == [("vda", str(domain.disks[0]))]
    assert not leftover_overlays(domain)
    time.sleep(2)  # the guest runs on (its console file may have started afresh)
    domain.wait_counter(domain.counter() + 3)
    domain.shut_down()
    last = stopped_at(domain.console_text())
    disk = read_disk(domain.disks[0], tmp_path / "after.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) == last


BACKUP_SCRIPT = """
import sys
from pathlib import Path
from kvmsnap_plugin.model import ArchiveTarget, BackupJob, ForkOptions
from kvmsnap_plugin.run.pipeline import backup
name, uri, work, repo = sys.argv[1:]
backup(BackupJob(name, None, ForkOptions(workdir=Path(work)),
                 (ArchiveTarget("borg", "borg", "files", {"repository": repo}),),
                 domain=name, libvirt_uri=uri))
"""


@pytest.mark.parametrize("point", ["paused", "disk-snapshot", "ram-save", "clone-loading",
                                   "commit"])
def test_sigkill_at_each_phase_then_recover(start_domain, tmp_path, borg_repo, point):
    domain = start_domain()
    blklist = domain.blklist()
    before = domain.wait_counter(5)
    work = tmp_path / "work"
    killed = subprocess.run(
        [sys.executable, "-c", BACKUP_SCRIPT, domain.name, domain.uri, str(work),
         str(borg_repo)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "KVMSNAP_FAULT": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(state_dir().glob("*.json")), "the killed run left no journal"
    recovered = subprocess.run([sys.executable, "-m", "kvmsnap_plugin.cli", "recover",
                                "--json"], capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr[-2000:]
    assert [r["problems"] for r in json.loads(recovered.stdout)] == [[]]
    assert domain.state() == "running" and domain.blklist() == blklist
    assert domain.inactive_sources() == [str(domain.disks[0])]
    assert not leftover_overlays(domain) and not list(state_dir().glob("*.json"))
    assert [p for p in work.rglob("*") if not p.is_dir()] == []
    # The guest never noticed: it goes on, and later shuts down with every line on disk.
    domain.wait_counter(domain.counter() + 3)
    domain.shut_down()
    disk = read_disk(domain.disks[0], tmp_path / "after.raw")
    assert disk.state is FsState.CLEAN and disk.continuous and len(disk.lines) > before
