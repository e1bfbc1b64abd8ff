"""pytest fixtures for testing against real demo guests (a pytest plugin).

Load with ``pytest_plugins = ["kvmsnap_demo.testing"]``. Third-party kvmsnap plugins can
use it to test their hooks against a real guest. Every fixture owns what it starts and
cleans it up, also when the test fails; a session-level check fails the run if a QEMU
process, mount or loop device started by the tests survives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmsnap_demo import hugetlb, qemu_builds
from kvmsnap_demo.builder import DemoGuest, build_guest
from kvmsnap_demo.debian import (
    DebianGuest,
    DebianVM,
    RealisticGuest,
    build_debian_guest,
    build_realistic_guest,
    debian_vm,
)
from kvmsnap_demo.disk import DiskContents, read_disk
from kvmsnap_demo.vm import DemoOptions, DemoVM, demo_vm
from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host import probes, process


@pytest.fixture(scope="session", autouse=True)
def kvmsnap_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Journals and locks of the tests' runs, kept away from the host's /var/lib/kvmsnap."""
    directory = tmp_path_factory.mktemp("kvmsnap-state")
    with process.environment({"KVMSNAP_STATE_DIR": str(directory)}):
        yield directory


@pytest.fixture(scope="session")
def demo_guest() -> DemoGuest:
    """The cached demo guest (built on first use). Fails, never skips, without QEMU."""
    return build_guest()


@pytest.fixture(scope="session")
def debian_guest() -> DebianGuest:
    """The cached Debian guest (systemd, GPT: ext4 root + xfs data; built once, ~1 min).

    Fails, never skips, without QEMU or debootstrap's prerequisites."""
    return build_debian_guest()


@pytest.fixture(scope="session")
def realistic_debian_guest(debian_guest: DebianGuest, accel: str) -> RealisticGuest:
    """The Debian guest plus a second disk laid out like real installs: GPT with BIOS boot,
    EFI vfat at /boot/efi, swap, an ext4 LV at /srv, btrfs, ext4 in LUKS2 at /secret.

    The guest lays the disk out itself on one boot, cached beside the image (minutes,
    once); start it with ``kvmsnap_demo.debian.realistic_vm``."""
    return build_realistic_guest(debian_guest, accel)


@pytest.fixture
def start_debian(debian_guest: DebianGuest, accel: str,
                 tmp_path: Path) -> Iterator[Callable[..., DebianVM]]:
    """Factory: ``start_debian(memory_mib=..., extra_args=...)`` -> a ready DebianVM."""
    counter = itertools.count()
    with contextlib.ExitStack() as stack:
        def start(**options: object) -> DebianVM:
            workdir = tmp_path / f"debian{next(counter)}"
            vm = stack.enter_context(debian_vm(debian_guest, accel, workdir, **options))  # type: ignore[arg-type]
            vm.wait_ready()
            return vm

        yield start


@pytest.fixture(scope="session")
def accel(demo_guest: DemoGuest) -> str:
    return probes.choose_accelerator(demo_guest.kernel, demo_guest.initrd)[0]


@pytest.fixture
def start_demo(demo_guest: DemoGuest, accel: str,
               tmp_path: Path) -> Iterator[Callable[..., DemoVM]]:
    """Factory: ``start_demo(disks=2, power_button="ignore", ...)`` -> a ready DemoVM.

    ``inside=DIR`` puts the VM's disk images in DIR (e.g. a path with odd characters).
    """
    counter = itertools.count()
    with contextlib.ExitStack() as stack:
        def start(inside: Path | None = None, **options: object) -> DemoVM:
            workdir = (inside or tmp_path) / f"vm{next(counter)}"
            workdir.mkdir()
            vm = stack.enter_context(
                demo_vm(demo_guest, accel, DemoOptions(**options), workdir=workdir))  # type: ignore[arg-type]
            vm.wait_ready()
            return vm

        yield start


@pytest.fixture(scope="session", params=qemu_builds.BUILDS, ids=lambda name: f"qemu{name}")
def qemu_build(request: pytest.FixtureRequest) -> qemu_builds.QemuBuild:
    """Each QEMU of the version matrix in turn: Debian 12's 7.2 and QEMU 10.0 from a private
    prefix; start the parent with ``start_demo(binary=qemu_build.binary)``.

    A missing build fails the test (in CI and out of it), never skips it: `make test`
    provisions QEMU 10 first."""
    try:
        return qemu_builds.qemu_build(request.param)
    except KvmsnapError as exc:
        problem = exc.one_line()
    pytest.fail(problem, pytrace=False)  # outside the except: one line, no chained traceback


@pytest.fixture
def huge_page_pool() -> Iterator[Callable[[int], None]]:
    """``grow(pages)``: more 2 MiB huge pages in the host's pool, for this test only (the
    pool is set back afterwards, whatever happened; one such test at a time, machine-wide)."""
    with hugetlb.held_pool() as grow:
        yield grow


@pytest.fixture
def crash_consistent_copy(tmp_path: Path) -> Callable[[DemoVM, int], DiskContents]:
    """``copy(vm, disk_index)``: the disk as a power cut would leave it, read back."""
    counter = itertools.count()

    def copy(vm: DemoVM, index: int = 0) -> DiskContents:
        raw = vm.crash_copy(index, tmp_path / f"crash{next(counter)}.raw")
        try:
            return read_disk(raw, raw)
        finally:
            raw.unlink(missing_ok=True)

    return copy


def leftovers(pids: list[int]) -> list[str]:
    """QEMU processes, mounts and loop devices the tests started and did not clean up."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            continue
        if state != "Z":
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            found.append(f"process {pid}: {cmdline.decode(errors='replace')[:120]}")
    # Only what lives in pytest's temp dirs is the tests' own (other work may run here).
    for line in Path("/proc/mounts").read_text().splitlines():
        if "/pytest-of-" in line:
            found.append(f"mount: {line}")
    loops = process.run(["losetup", "-a"], timeout=30, check=False).stdout
    found += [f"loop device: {line}" for line in loops.splitlines() if "/pytest-of-" in line]
    return found


@pytest.fixture(scope="session", autouse=True)
def kvmsnap_nothing_left_behind() -> Iterator[None]:
    """Fail the session if anything the tests started survives it."""
    before = len(process.SPAWNED_PIDS)
    yield
    left = leftovers(process.SPAWNED_PIDS[before:])
    if left and not os.environ.get("KVMSNAP_ALLOW_LEFTOVERS"):
        pytest.fail("left behind by the tests:\n" + "\n".join(left), pytrace=False)


BORG_PASSPHRASE = "correct horse battery staple kvmsnap-test"
RESTIC_PASSWORD = "restic secret kvmsnap-test"


@pytest.fixture
def borg_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, encrypted borg repository; its passphrase is in the environment only."""
    monkeypatch.setenv("BORG_PASSPHRASE", BORG_PASSPHRASE)
    monkeypatch.setenv("BORG_BASE_DIR", str(tmp_path / "borg-base"))
    repo = tmp_path / "borg-repo"
    process.run([process.find_program("borg", "borgbackup"), "init", "--encryption=repokey",
                 repo], timeout=120)
    return repo


@pytest.fixture
def restic_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty restic repository; its password is in the environment only."""
    monkeypatch.setenv("RESTIC_PASSWORD", RESTIC_PASSWORD)
    monkeypatch.setenv("RESTIC_CACHE_DIR", str(tmp_path / "restic-cache"))
    repo = tmp_path / "restic-repo"
    process.run(["restic", "init", "-r", repo], timeout=120)
    return repo
