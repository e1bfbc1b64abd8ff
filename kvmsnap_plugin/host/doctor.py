"""`kvmsnap doctor`: what this host can do, and what to install for the rest."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmsnap_plugin.errors import KvmsnapError
from kvmsnap_plugin.host import probes, process


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" (works, degraded) or "fail" (a required part is missing)
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _version_of(program: str, package: str, args: tuple[str, ...] = ("--version",)) -> str:
    out = process.run([process.find_program(program, package), *args], timeout=60)
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "(no version output)"


def check_program(name: str, program: str, package: str, required: bool = True,
                  args: tuple[str, ...] = ("--version",)) -> Check:
    try:
        return Check(name, "ok", _version_of(program, package, args))
    except KvmsnapError as exc:
        return Check(name, "fail" if required else "warn", str(exc), exc.hint)


def ask_qemu(binary: str, commands: Sequence[str], *, machine: str = "none",
             timeout: float = 30) -> list[dict]:
    """What a QEMU binary answers to QMP ``commands`` (one reply dict each), no guest run.

    Asking the binary is the probe: its capabilities, not a version string, tell what it
    can do. ``machine="pc"`` also loads the firmware (a check that it is found). No guest
    code runs (``-S``), so the build's default accelerator will do (RHEL's has no TCG)."""
    script = [{"execute": "qmp_capabilities"}, *({"execute": c} for c in commands),
              {"execute": "quit"}]
    out = process.run([binary, "-machine", machine, "-S", "-nodefaults",
                       "-display", "none", "-qmp", "stdio"], timeout=timeout,
                      input="".join(json.dumps(line) + "\n" for line in script).encode())
    replies = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    answers = [r for r in replies if "return" in r or "error" in r]
    return answers[1:1 + len(commands)]


def check_qemu() -> Check:
    try:
        version = probes.qemu_version()
        binary = process.find_program(probes.QEMU, "qemu-system-x86")
    except KvmsnapError as exc:
        return Check("qemu", "fail", str(exc), "apt-get install qemu-system-x86 qemu-utils")
    shown = ".".join(map(str, version))
    if version < (7, 2, 0):
        return Check("qemu", "warn", f"QEMU {shown} ({binary}): background snapshots need "
                     "6.0+, kvmsnap is tested on 7.2 and 10.0", "upgrade QEMU")
    return Check("qemu", "ok", f"QEMU {shown} ({binary}); a VM started from another QEMU "
                 "is cloned with its own binary")


def check_ram_method() -> Check:
    """Which RAM snapshot a fork of a VM on the system QEMU takes by default (auto)."""
    try:
        binary = process.find_program(probes.QEMU, "qemu-system-x86")
        answer = ask_qemu(binary, ["query-migrate-capabilities"])[0]
    except (KvmsnapError, IndexError, ValueError) as exc:
        return Check("ram-method", "fail", f"could not ask QEMU its migration capabilities: "
                     f"{exc}", "run `qemu-system-x86_64 -machine none -qmp stdio` by hand")
    capabilities = {c["capability"] for c in answer.get("return", [])}
    if "background-snapshot" not in capabilities:
        return Check("ram-method", "warn", "stop-and-copy: this QEMU has no "
                     "background-snapshot capability (the VM pauses for the whole RAM save)",
                     "QEMU 6.0+")
    uffd_ok, why = probes.uffd_wp_supported()
    if not uffd_ok:
        return Check("ram-method", "warn", f"stop-and-copy: QEMU can background-snapshot "
                     f"but {why}", "run as root, or sysctl vm.unprivileged_userfaultfd=1")
    return Check("ram-method", "ok", "background-snapshot (QEMU has the capability, the "
                 "kernel userfaultfd write-protect); --method stop-and-copy on request")


def check_resume_logic() -> Check:
    """Who resumes the guest after a background snapshot: seen only at run time."""
    try:
        version = probes.qemu_version()
    except KvmsnapError as exc:
        return Check("resume-logic", "fail", str(exc), "apt-get install qemu-system-x86")
    expected = ("QEMU restores the runstate kvmsnap paused, kvmsnap resumes the guest"
                if version >= (9, 0, 0) else "QEMU resumes the guest itself after the capture")
    return Check("resume-logic", "ok", "decided per run by watching RESUME (7.2: QEMU "
                 "resumes the guest itself; 9.0+: the previous runstate is restored and "
                 f"kvmsnap resumes it); expected for QEMU {'.'.join(map(str, version))}: "
                 f"{expected}")


#: what a kernel prints when it booted as far as mounting its root (no initrd given)
KERNEL_BOOTED = "Kernel panic - not syncing: VFS"


def host_kernel() -> Path | None:
    """The host's own kernel image, to probe KVM with when no test guest did."""
    image = Path("/boot") / f"vmlinuz-{os.uname().release}"
    return image if os.access(image, os.R_OK) else None


def check_accelerator() -> Check:
    """Clones always run on their parent's accelerator; this only tells what guests get.
    Decided by booting a kernel under KVM (bounded): a test guest's probe, cached until
    reboot, or else the host's own kernel, no guest needed."""
    known = probes.cached_accelerator()
    kernel = host_kernel()
    if known is None and kernel is not None:
        known = probes.choose_accelerator(kernel, None, booted=KERNEL_BOOTED)
    if known is None:
        usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
        return Check("accelerator", "warn",
                     f"not probed (/dev/kvm {'present' if usable else 'absent'}; no readable "
                     f"/boot/vmlinuz-{os.uname().release} to boot); clones run on their "
                     "parent's accelerator", "KVMSNAP_ACCEL=kvm|tcg tells kvmsnap")
    accel, why = known
    status = "ok" if accel == "kvm" else "warn"
    fix = "" if accel == "kvm" else "guests run under TCG (slow but correct); enable KVM"
    return Check("accelerator", status, f"{accel}: {why}", fix)


def share_dir() -> Path | None:
    """Where the hook scripts, units and examples are: the environment's share/kvmsnap
    (installed from the wheel), or the checkout's top level (a development install)."""
    for root in (Path(sysconfig.get_path("data")) / "share" / "kvmsnap",
                 Path(__file__).resolve().parents[2]):
        if (root / "hooks" / "kvmsnap-borgmatic-before").is_file():
            return root
    return None


def check_hooks() -> Check:
    root = share_dir()
    if root is None:
        return Check("hooks", "warn", "the hook scripts were not found",
                     "install kvmsnap from its wheel or `make install`")
    hooks = sorted(p.name for p in (root / "hooks").iterdir() if os.access(p, os.X_OK))
    return Check("hooks", "ok", f"hook scripts in {root / 'hooks'} ({', '.join(hooks)}); "
                 f"units and examples in {root / 'contrib'}")


def check_uffd() -> Check:
    ok, why = probes.uffd_wp_supported()
    if ok:
        return Check("background-snapshot", "ok", why)
    return Check("background-snapshot", "warn", f"{why}; forks fall back to stop-and-copy "
                 "(longer pause)", "run as root, or sysctl vm.unprivileged_userfaultfd=1")


def check_huge_pages() -> Check:
    from kvmsnap_plugin.host.hugepages import collapse_supported

    works, why = collapse_supported()
    if works:
        return Check("huge-pages", "ok", f"{why}: guest RAM huge pages are re-collapsed "
                     "after each RAM snapshot (collapse_huge_pages, on by default)")
    return Check("huge-pages", "warn", f"{why}; collapse_huge_pages (on by default) has no "
                 "effect: back-to-back background-snapshot pauses are several times longer",
                 "Linux 6.1+, run as root (CAP_SYS_NICE), THP enabled (madvise or always)")


def check_fuse() -> Check:
    have_dev = Path("/dev/fuse").exists()
    in_kernel = "fuse" in Path("/proc/filesystems").read_text()
    if have_dev and in_kernel:
        return Check("fuse", "ok", "/dev/fuse present (qemu-storage-daemon exports)")
    return Check("fuse", "fail", "no usable /dev/fuse", "modprobe fuse; apt-get install fuse3")


def check_loop() -> Check:
    if not Path("/dev/loop-control").exists():
        return Check("loop", "fail", "no /dev/loop-control", "modprobe loop")
    try:
        process.find_program("losetup", "mount")
    except KvmsnapError as exc:
        return Check("loop", "fail", str(exc), exc.hint)
    return Check("loop", "ok", "loop devices available")


def check_nbd() -> Check:
    present = Path("/sys/module/nbd").exists() or Path("/dev/nbd0").exists()
    return Check("nbd", "ok", "nbd module loaded (not needed)" if present
                 else "no nbd module (not needed: kvmsnap exports disks through FUSE)")


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("privileges", "ok", "running as root")
    return Check("privileges", "warn", "not root: mounts, loop devices and background "
                 "snapshots need root", "run kvmsnap as root")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_root,
    check_qemu,
    lambda: check_program("qemu-img", "qemu-img", "qemu-utils"),
    lambda: check_program("qemu-storage-daemon", "qemu-storage-daemon", "qemu-system-common"),
    check_accelerator,
    check_uffd,
    check_ram_method,
    check_resume_logic,
    check_huge_pages,
    check_fuse,
    check_loop,
    check_nbd,
    lambda: check_program("e2fsprogs", "dumpe2fs", "e2fsprogs", args=("-V",)),
    lambda: check_program("xfsprogs", "xfs_logprint", "xfsprogs", required=False,
                          args=("-V",)),
    lambda: check_program("borg", "borg", "borgbackup (pip install borgbackup)",
                          required=False),
    lambda: check_program("restic", "restic", "restic", required=False, args=("version",)),
    lambda: check_program("borgmatic", "borgmatic", "borgmatic (pip install borgmatic)",
                          required=False),
    check_hooks,
)


def run_checks() -> list[Check]:
    return [check() for check in CHECKS]


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        line = f"{check.status:4}  {check.name:{width}}  {check.detail}"
        if check.fix and check.status != "ok":
            line += f"  -> {check.fix}"
        lines.append(line)
    return "\n".join(lines)
