"""The `kvmsnap` command.

Exit codes: 0 success; 1 success with a warning (e.g. a labelled crash-consistent
fallback); 2 error; 75 deliberate skip (borgmatic's soft failure); 130 interrupted.
Errors print one line with the cause and the fix; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from kvmsnap_plugin import __version__
from kvmsnap_plugin.errors import KvmsnapError

EXIT_OK, EXIT_WARNING, EXIT_ERROR, EXIT_SKIP, EXIT_INTERRUPTED = 0, 1, 2, 75, 130

log = logging.getLogger("kvmsnap")


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvmsnap_plugin import doctor

    checks = doctor.run_checks()
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        print(doctor.render(checks))
    return EXIT_ERROR if any(c.status == "fail" for c in checks) else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.demo.run import run_demo

    report = run_demo()
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return EXIT_OK


def fork_options(args: argparse.Namespace):
    from pathlib import Path

    from kvmsnap_plugin.pipeline import DEFAULT_WORKDIR, ForkOptions
    from kvmsnap_plugin.shutdown import ShutdownPolicy

    return ForkOptions(
        method=args.method,
        shutdown=ShutdownPolicy(timeout=args.shutdown_timeout,
                                repress_after=min(args.repress_after, args.shutdown_timeout),
                                on_unclean=args.on_unclean),
        keep_dir=Path(args.keep) if args.keep else None,
        workdir=Path(args.workdir) if args.workdir else DEFAULT_WORKDIR,
        overlay_dir=Path(args.overlay_dir) if args.overlay_dir else None,
        clone_console=Path(args.clone_console) if args.clone_console else None,
        pid=args.pid,
    )


def cmd_fork(args: argparse.Namespace) -> int:
    from kvmsnap_plugin.parent import find_parent_socket
    from kvmsnap_plugin.pipeline import fork_vm

    result = fork_vm(find_parent_socket(args.qmp), fork_options(args))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        print(render_fork(result))
    return EXIT_OK if result.clean else EXIT_WARNING


def render_fork(result) -> str:
    lines = [f"{result.vm}: {result.label} ({result.method}); parent paused "
             f"{result.pause_ms:.1f} ms; clone restored in {result.clone_restore_s:.1f} s, "
             f"shut down in {result.shutdown.seconds:.1f} s ({result.shutdown.reason})"]
    for verdict in result.verdicts:
        where = verdict.disk + (f"/{verdict.partition}" if verdict.partition else "")
        lines.append(f"  {where:20} {verdict.fstype:6} {verdict.state.value:15} "
                     f"{verdict.detail}")
    lines += [f"  kept: {path}" for path in result.kept]
    return "\n".join(lines)


def add_fork_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--qmp", required=True, metavar="SOCKET",
                     help="the running VM's QMP unix socket")
    cmd.add_argument("--pid", type=int, help="the QEMU process (default: from the socket)")
    cmd.add_argument("--method", choices=("auto", "background-snapshot", "stop-and-copy"),
                     default="auto", help="how to snapshot RAM (default: background if the "
                     "host supports it)")
    cmd.add_argument("--shutdown-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="power button to a stopped clone, at most (default 300)")
    cmd.add_argument("--repress-after", type=float, default=60.0, metavar="SECONDS",
                     help="press the power button again after this long (default 60)")
    cmd.add_argument("--on-unclean", choices=("fail", "crash-consistent"), default="fail",
                     help="when the clone does not shut down: fail (default), or use the "
                     "crash-consistent images, labelled as such (exit code 1)")
    cmd.add_argument("--workdir", help="private work directory (default /var/tmp/kvmsnap)")
    cmd.add_argument("--overlay-dir", help="where the parent's temporary overlays go "
                     "(default: beside each disk image)")
    cmd.add_argument("--keep", metavar="DIR", help="keep the clone's disks as standalone "
                     "qcow2 images in DIR")
    cmd.add_argument("--clone-console", metavar="FILE",
                     help="capture the clone's first serial port to FILE (debugging)")


def cmd_guest(args: argparse.Namespace) -> int:
    from kvmsnap_plugin import host
    from kvmsnap_plugin.demo.builder import build_guest

    guest = build_guest()
    accel, why = host.choose_accelerator(guest.kernel, guest.initrd)
    info = {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
            "kernel_version": guest.kernel_version, "accelerator": accel, "why": why}
    print(json.dumps(info, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in info.items()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmsnap",
        description="Consistent backups of running QEMU/KVM guests: fork the guest, shut "
                    "the copy down cleanly, archive its disks.",
        epilog="exit codes: 0 ok, 1 warning, 2 error, 75 skipped, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"kvmsnap {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug log and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        cmd.set_defaults(func=func)
        return cmd

    add("doctor", cmd_doctor, "check what this host can do and what to install")
    add("demo", cmd_demo, "run the main job on the bundled demo guest")
    add_fork_arguments(add("fork", cmd_fork, "fork a running VM, shut the clone down "
                           "cleanly and report its disks' verdicts"))
    add("guest", cmd_guest, "build (or find) the cached demo guest and the accelerator")
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("kvmsnap: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not debug:
        # qemu.qmp logs every disconnect at WARNING; our own messages say what matters.
        logging.getLogger("qemu").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug, args.quiet)
    try:
        return args.func(args)
    except KvmsnapError as exc:
        if args.debug:
            log.exception("failed")
        print(f"kvmsnap: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvmsnap: interrupted; everything started was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"kvmsnap: internal error: {type(exc).__name__}: {exc} "
              "(fix: run again with --debug and report the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
