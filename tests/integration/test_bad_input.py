"""Bad input and hostile conditions: each gives one line that says what to do, exit code 2,
and touches nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cli_helpers import assert_one_line_error, kvmsnap, tmpfs

from kvmsnap_plugin.host import process
from kvmsnap_plugin.model import BackupJob
from kvmsnap_plugin.run.journal import Journal, vm_identity

pytestmark = pytest.mark.qemu


def never_paused(vm) -> bool:
    return not [e for e in vm.qmp.events() if e.name == "STOP"]


def test_missing_socket(tmp_path):
    assert_one_line_error(kvmsnap("fork", "--qmp", str(tmp_path / "nope.qmp")),
                          "no such QMP socket")


def test_a_socket_path_that_is_a_regular_file(tmp_path):
    path = tmp_path / "file.qmp"
    path.write_text("not a socket")
    assert_one_line_error(kvmsnap("fork", "--qmp", str(path)), "cannot connect")


def test_backup_without_targets(tmp_path):
    path = tmp_path / "x.qmp"
    path.touch()
    assert_one_line_error(kvmsnap("backup", "--qmp", str(path)), "no archive target")


def test_config_and_qmp_together(tmp_path):
    assert_one_line_error(kvmsnap("backup", "--config", str(tmp_path / "c.toml"), "--qmp",
                                  str(tmp_path / "x")), "cannot be combined")


def test_config_with_an_unknown_key(tmp_path):
    config = tmp_path / "kvmsnap.toml"
    config.write_text('[[vm]]\nqmp = "/x"\ncomression = "zstd"\n')
    assert_one_line_error(kvmsnap("backup", "--config", str(config)), "'comression'")


def test_a_pid_that_is_not_qemu(start_demo):
    vm = start_demo()
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--pid", str(os.getpid()))
    assert_one_line_error(done, "is not QEMU")
    assert never_paused(vm)


def test_a_too_small_shutdown_timeout(start_demo):
    vm = start_demo()
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--shutdown-timeout", "0.5")
    assert_one_line_error(done, "--shutdown-timeout: expected a number of seconds, at least 1")


def test_an_unwritable_work_directory(start_demo):
    vm = start_demo()
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir", "/proc/kvmsnap")
    assert_one_line_error(done, "cannot create the work directory /proc/kvmsnap")
    assert never_paused(vm)


def test_two_runs_on_one_vm(start_demo):
    vm = start_demo()
    with Journal.acquire(vm_identity(BackupJob("demo", vm.paths.backup_qmp))):
        done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp))
        other_socket = kvmsnap("fork", "--qmp", str(vm.paths.qmp))  # the same VM
    assert_one_line_error(done, "another kvmsnap run", f"pid {os.getpid()}")
    assert_one_line_error(other_socket, "another kvmsnap run", f"pid {os.getpid()}")
    assert never_paused(vm)


@pytest.mark.parametrize("option, value, needle", [
    ("--min-free", "lots", "the command line --min-free: expected a size"),
    ("--max-pause", "0", "the command line --max-pause: expected a number of seconds above 0"),
])
def test_a_bad_margin_or_pause_cap(start_demo, option, value, needle):
    vm = start_demo()
    assert_one_line_error(kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), option, value),
                          needle)
    assert never_paused(vm)


def test_a_pause_longer_than_allowed(start_demo):
    vm = start_demo()  # 256 MiB: stop-and-copy pauses about a second for it
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--method", "stop-and-copy",
                   "--max-pause", "0.1")
    assert_one_line_error(done, "would pause the VM", "more than the 0.1 s allowed",
                          "--max-pause")
    assert never_paused(vm)


@pytest.fixture
def small_tmpfs(tmp_path):
    with tmpfs(tmp_path / "small", "16m") as directory:
        yield directory


def test_overlays_on_a_filesystem_without_the_margin(start_demo, small_tmpfs, tmp_path):
    vm = start_demo()
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--overlay-dir",
                   str(small_tmpfs), "--workdir", str(tmp_path / "work"))
    assert_one_line_error(done, f"not enough free space in {small_tmpfs} for the parent's "
                          "overlays", "16 MiB free", "the VM was not paused", "--overlay-dir",
                          "--min-free")
    assert never_paused(vm)
    assert list(small_tmpfs.iterdir()) == []


def test_a_vm_in_huge_pages_without_free_ones_for_the_clone(start_demo, huge_page_pool):
    huge_page_pool(64)  # exactly the parent's 128 MiB
    vm = start_demo(memory_mib=128, extra_args=(
        "-object", "memory-backend-memfd,id=ram0,size=128M,hugetlb=on,hugetlbsize=2M,"
                   "prealloc=on", "-machine", "memory-backend=ram0"))
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp))
    assert_one_line_error(done, "not enough free 2 MiB huge pages for the clone: 0 free, "
                          "64 needed", "nr_hugepages")
    assert never_paused(vm)


def test_a_migrating_vm(start_demo, tmp_path):
    vm = start_demo()
    vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1024})  # stays "active"
    vm.qmp.execute("migrate", {"uri": "exec:cat > /dev/null"})
    try:
        assert_one_line_error(kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp)),
                              "migrating")
    finally:
        vm.qmp.execute("migrate_cancel")


def test_a_vm_without_writable_disks(start_demo):
    vm = start_demo(disks=0)
    assert_one_line_error(kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp)),
                          "no writable disk")


@pytest.fixture
def nbd_export(tmp_path):
    """A raw image served by qemu-nbd on a unix socket: a disk on a network protocol."""
    backing, sock = tmp_path / "raw.img", tmp_path / "nbd.sock"
    with open(backing, "wb") as handle:
        handle.truncate(16 << 20)
    server = process.spawn(["qemu-nbd", "-t", "-k", sock, "-f", "raw", backing])
    while not sock.exists() and server.poll() is None:
        time.sleep(0.05)
    yield f"nbd+unix:///?socket={sock}"
    process.stop(server)


def test_a_disk_on_a_network_protocol_is_refused(start_demo, nbd_export):
    vm = start_demo(extra_args=("-drive", f"file={nbd_export},format=raw,if=none,id=blk0",
                                "-device", "virtio-blk-pci,drive=blk0,id=vblk0"))
    assert_one_line_error(kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp)),
                          "is on the nbd protocol", "map a network volume on the host")
    assert never_paused(vm)


def test_a_missing_restic_binary(start_demo, restic_repo):
    vm = start_demo()
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--restic", str(restic_repo),
                   env={"PATH": "/nonexistent"})
    assert_one_line_error(done, "program not found: restic", "apt-get install restic")
    assert never_paused(vm)


def test_restic_without_a_password(start_demo, restic_repo):
    vm = start_demo()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_PASSWORD")}
    done = subprocess.run([sys.executable, "-m", "kvmsnap_plugin.cli", "backup", "--qmp",
                           str(vm.paths.backup_qmp), "--restic", str(restic_repo)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_error(done, "needs the repository password", "RESTIC_PASSWORD_FILE")
    assert never_paused(vm)


def test_paths_with_spaces_commas_and_quotes_work(start_demo, tmp_path, borg_repo):
    odd = tmp_path / "it's a \"VM\", really; $(true)"
    odd.mkdir()
    vm = start_demo(inside=odd)
    done = kvmsnap("backup", "--qmp", str(vm.paths.backup_qmp), "--name", "vm 'one'; ls",
                   "--workdir", str(odd / "work dir"), "--borg", str(borg_repo), "--mode",
                   "both")
    assert done.returncode == 0, done.stderr[-2000:]
    listing = process.run([process.find_program("borg", "borgbackup"), "list", "--short",
                           borg_repo], timeout=60).stdout.split("\n")
    assert any(name.startswith("vm 'one'; ls-") for name in listing)


def test_release_with_nothing_mounted_is_fine(tmp_path):
    done = kvmsnap("release", "--qmp", str(tmp_path / "vm.qmp"))
    assert done.returncode == 0 and "nothing to release" in done.stdout


def test_mount_of_a_vm_that_is_not_running_skips_softly(tmp_path):
    done = kvmsnap("mount", "--qmp", str(tmp_path / "gone.qmp"), "--skip-missing")
    assert done.returncode == 75, done.stderr


def test_a_labelled_crash_consistent_fallback_exits_with_a_warning(start_demo, tmp_path):
    vm = start_demo(power_button="ignore")
    done = kvmsnap("fork", "--qmp", str(vm.paths.backup_qmp), "--workdir",
                   str(tmp_path / "work"), "--shutdown-timeout", "4", "--repress-after", "2",
                   "--on-unclean", "crash-consistent", "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["label"] == "crash-consistent" and report["clean"] is False
    assert report["verdicts"][0]["state"] == "needs-recovery"
    assert any("did not shut down cleanly" in w for w in report["warnings"])
