"""A UEFI guest (OVMF, with a writable VARS flash) backed up and restored: the VARS store is
forked with the disks, archived in both modes, committed back, and restored; as a bare QEMU
(both spellings of the flash) and as a libvirt domain (its ``<nvram>``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from cli_helpers import kvmsnap

from kvmsnap_demo.builder import make_data_disk
from kvmsnap_demo.vm import OVMF_CODE, OVMF_VARS, DemoOptions, demo_vm
from kvmsnap_plugin.backends.libvirt import connect
from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import METADATA_FILE, ArchiveTarget, BackupJob, ForkOptions
from kvmsnap_plugin.plugin.manager import Hooks, plugin_manager
from kvmsnap_plugin.run.pipeline import backup

pytestmark = pytest.mark.qemu
pytest_plugins = ["libvirt_fixtures"]  # the libvirtd fixture

VARS_QDEV = "/machine/system.flash1"
#: the VARS store's last sector: what the "firmware" writes while the backup runs
LAST_SECTOR = 540672 - 512


def borg(*args: object, cwd: Path | None = None) -> str:
    return process.run([process.find_program("borg", "borgbackup"), *map(str, args)],
                       timeout=600, cwd=cwd).stdout


def extract(repo: Path, kind: str, into: Path) -> Path:
    """The repository's one archive of ``kind`` (files, image), extracted into ``into``."""
    [name] = [n for n in borg("list", "--short", repo).split() if n.endswith(f"-{kind}")]
    into.mkdir()
    borg("extract", f"{repo}::{name}", cwd=into)
    return into


def vars_layers(query_block: list[dict]) -> int:
    """How many images the VARS flash reads through: 1 alone, 2 with kvmsnap's overlay."""
    [flash] = [b for b in query_block if b.get("qdev") == VARS_QDEV]
    return 1 + flash["inserted"]["backing_file_depth"]


def write_while_forked(query_block: Callable[[], list[dict]], hmp: Callable[[str], object],
                       backup) -> bytes:
    """Once the VARS flash runs on kvmsnap's overlay, write its last sector as the firmware
    would (qemu-io through the device's own block backend); what the parent then wrote."""
    while vars_layers(query_block()) == 1:
        assert not backup.done(), backup.result()
        time.sleep(0.05)
    hmp(f'qemu-io -d {VARS_QDEV} "write -P 0x5a {LAST_SECTOR} 512"')
    return b"\x5a" * 512


@pytest.mark.parametrize("syntax", ["drive", "blockdev"])
def test_a_uefi_guest_is_backed_up_with_its_vars_store(start_demo, borg_repo, tmp_path,
                                                       syntax):
    vm = start_demo(uefi=syntax)
    vars_file = vm.paths.uefi_vars
    at_fork = vars_file.read_bytes()  # OVMF wrote it at boot; the guest is idle since
    assert at_fork != OVMF_VARS.read_bytes()
    with ThreadPoolExecutor(1) as pool:
        backup = pool.submit(kvmsnap, "backup", "--qmp", str(vm.paths.backup_qmp), "--name",
                             "uefi", "--workdir", str(tmp_path / "work"), "--borg",
                             str(borg_repo), "--mode", "both")
        written = write_while_forked(lambda: vm.qmp.execute("query-block"), vm.qmp.hmp,
                                     backup)
        done = backup.result()
    # exit 0: the VARS store is archived, not an "unknown" partition left out
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT ARCHIVED" not in done.stderr + done.stdout

    # Files mode: uefi-vars.fd beside the disk trees; image mode: the flash as a disk;
    # both as the fork left it, without what the parent wrote after it.
    files = extract(borg_repo, "files", tmp_path / "files")
    assert (files / "uefi-vars.fd").read_bytes() == at_fork
    assert (files / "vdisk0" / "workload.log").exists()
    image = extract(borg_repo, "image", tmp_path / "image")
    [flash] = [d for d in json.loads((image / METADATA_FILE).read_text())["disks"]
               if d["flash"]]
    assert flash["image"] == str(vars_file) and flash["format"] == "raw"
    assert (image / f"{flash['device']}.raw").read_bytes() == at_fork

    # The parent's write during the backup was committed back into its own VARS file, which
    # it reads alone again (no overlay left), and which it still writes.
    assert vars_file.read_bytes() == at_fork[:LAST_SECTOR] + written
    assert vars_layers(vm.qmp.execute("query-block")) == 1
    assert sorted(p.name for p in vars_file.parent.glob("*kvmsnap*")) == []
    vm.qmp.hmp(f'qemu-io -d {VARS_QDEV} "write -P 0xa5 0 512"')
    assert vars_file.read_bytes()[:512] == b"\xa5" * 512
    vm.wait_counter(vm.counter() + 2)  # and the guest runs on


def test_kvmsnap_restore_brings_the_vars_store_back_and_it_boots(start_demo, demo_guest,
                                                                 accel, borg_repo,
                                                                 restic_repo, tmp_path):
    vm = start_demo(uefi="drive")
    at_fork = vm.paths.uefi_vars.read_bytes()
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "uefi",
                   "--workdir", str(tmp_path / "work"), "--borg", str(borg_repo),
                   "--restic", str(restic_repo), "--mode", "image")
    assert done.returncode == 0, done.stderr[-3000:]
    from_restic = kvmsnap("restore", "--restic", str(restic_repo), "--to",
                          str(tmp_path / "from-restic"), "--json")
    assert from_restic.returncode == 0, from_restic.stderr[-3000:]
    [flash] = [d for d in json.loads(from_restic.stdout)["disks"] if d["flash"]]
    assert Path(flash["path"]).read_bytes() == at_fork
    [archive] = borg("list", "--short", borg_repo).split()
    restored = kvmsnap("restore", "--borg", f"{borg_repo}::{archive}", "--to",
                       str(tmp_path / "restored"), "--json")
    assert restored.returncode == 0, restored.stderr[-3000:]
    disks = {d["device"]: d for d in json.loads(restored.stdout)["disks"]}
    assert disks["pflash1"]["flash"] and disks["pflash1"]["format"] == "raw"
    restored_vars = Path(disks["pflash1"]["path"])
    assert restored_vars.read_bytes() == at_fork
    argv = json.loads((tmp_path / "restored" / "boot-argv.json").read_text())
    assert f"if=pflash,unit=1,format=raw,file={restored_vars}" in argv
    assert "UEFI variable store" in (tmp_path / "restored" / "HOW-TO-BOOT.txt").read_text()

    # The restored disk boots through OVMF on the restored VARS store.
    (tmp_path / "boot").mkdir()
    with demo_vm(demo_guest, accel, DemoOptions(uefi="drive", uefi_vars=restored_vars),
                 workdir=tmp_path / "boot", disks=[Path(disks["vdisk0"]["path"])]) as booted:
        booted.wait_ready()
        assert any(b.get("qdev") == VARS_QDEV and b["inserted"]["file"] == str(restored_vars)
                   for b in booted.qmp.execute("query-block"))


def test_a_libvirt_uefi_domain_forks_its_nvram_with_its_disks(libvirtd, demo_guest, tmp_path,
                                                              borg_repo):
    """libvirt's snapshots leave the nvram out: kvmsnap forks it over QMP in the same pause."""
    from libvirt_fixtures import Domain, domain_xml  # here: the plugin is registered by now
    conn = connect(libvirtd)
    name = f"kvmsnap-uefi-{tmp_path.name[-12:]}"
    nvram = tmp_path / "VARS.fd"
    shutil.copyfile(OVMF_VARS, nvram)
    images = (make_data_disk(tmp_path / "data0.qcow2", 64, "data0"),)
    xml = domain_xml(name, demo_guest, images, tmp_path / "console.log").replace(
        "<kernel>", f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>"
                    f"<nvram>{nvram}</nvram><kernel>")
    try:
        domain = Domain(name, libvirtd, conn.defineXML(xml), images, tmp_path / "console.log")
        domain.dom.create()
        domain.wait_console("KVMSNAP-READY", 120)
        at_fork = nvram.read_bytes()
        job = BackupJob(name, None, ForkOptions(workdir=tmp_path / "work"),
                        (ArchiveTarget("borg", "borg", "both", {"repository": str(borg_repo)}),),
                        domain=name, libvirt_uri=libvirtd)

        def query_block() -> list[dict]:
            answer = domain.virsh("qemu-monitor-command", name, '{"execute":"query-block"}')
            return json.loads(answer)["return"]

        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(backup, job, Hooks(plugin_manager([], entry_points=False)))
            written = write_while_forked(
                query_block, lambda line: domain.virsh("qemu-monitor-command", "--hmp", name,
                                                       line), run)
            report = run.result()
        assert report.clean, report.warnings
        assert (extract(borg_repo, "files", tmp_path / "files") / "uefi-vars.fd"
                ).read_bytes() == at_fork
        image = extract(borg_repo, "image", tmp_path / "image")
        assert (image / "nvram.raw").read_bytes() == at_fork  # named as in libvirt's XML
        # committed back; libvirt's nodes are its own again and the domain powers off
        assert nvram.read_bytes() == at_fork[:LAST_SECTOR] + written
        assert vars_layers(query_block()) == 1 and not list(tmp_path.glob("*kvmsnap*"))
        domain.wait_counter(domain.counter() + 2)
        domain.shut_down()

        # Shut off, its nvram is archived as it is, with its disks.
        offline = backup(replace(job, targets=(ArchiveTarget(
            "borg", "borg", "image", {"repository": str(borg_repo)}),)),
            Hooks(plugin_manager([], entry_points=False)))
        [archive] = [a.name for a in offline.archives]
        (tmp_path / "offline").mkdir()
        borg("extract", f"{borg_repo}::{archive}", cwd=tmp_path / "offline")
        assert (tmp_path / "offline" / "nvram.raw").read_bytes() == nvram.read_bytes()
    finally:
        remove_keeping_nvram(conn, name)
        conn.close()


def remove_keeping_nvram(conn, name: str) -> None:
    """Destroy and undefine (libvirt refuses a plain undefine of a domain with nvram)."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        dom = conn.lookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
