"""``python -m kvmsnap_demo guest|demo|qemu10``: the demo and test guests, from a checkout.

Not part of the product: ``make guest``, ``make demo`` and ``make qemu10`` run it from the
checkout's root.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmsnap_plugin.cli import run_command


def cmd_demo(args: argparse.Namespace) -> int:
    from kvmsnap_demo.run import run_demo

    report = run_demo(Path(args.out))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.render())
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from kvmsnap_demo.builder import build_guest
    from kvmsnap_plugin.host import probes

    guest = build_guest()
    accel, why = probes.choose_accelerator(guest.kernel, guest.initrd)
    info = {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
            "kernel_version": guest.kernel_version, "accelerator": accel, "why": why}
    print(json.dumps(info, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def cmd_qemu10(args: argparse.Namespace) -> int:
    from kvmsnap_demo.qemu_builds import provision_qemu10

    build = provision_qemu10()
    info = {"name": build.name, "binary": build.binary, "version": build.version}
    print(json.dumps(info, indent=2) if args.json else
          "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvmsnap_demo",
                                     description="kvmsnap's demo and test guests")
    parser.add_argument("--debug", action="store_true", help="debug log and tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    parser.set_defaults(log=None)  # run_command's log destination: the default
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="back up the running demo guest into borg and restic, "
                          "and show the difference from a crash-consistent snapshot")
    demo.add_argument("--out", default="demo-out", metavar="DIR",
                      help="where the demo's borg and restic repositories go (replaced)")
    demo.set_defaults(func=cmd_demo)
    guest = sub.add_parser("guest", help="build (or find) the cached demo guest and the "
                           "accelerator")
    guest.set_defaults(func=cmd_guest)
    qemu10 = sub.add_parser("qemu10", help="download QEMU 10 from bookworm-backports into a "
                            "private prefix (once) for the tests' QEMU version matrix")
    qemu10.set_defaults(func=cmd_qemu10)
    for cmd in (demo, guest, qemu10):
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
