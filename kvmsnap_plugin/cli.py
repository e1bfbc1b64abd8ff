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
