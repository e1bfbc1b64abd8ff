"""QEMU command lines as data: options with values, and QEMU's key=value syntax.

``-drive file=a,,b.img,format=raw`` is QEMU's "QemuOpts" syntax: comma-separated key=value
pairs, a doubled comma stands for a literal comma, and an implied first key (``-netdev
user,...`` means ``type=user``). ``-blockdev`` also accepts JSON.

Which options take a value is the binary's to say: :func:`parse_help` reads it from the
``-help`` of the very binary the parent runs (see :mod:`kvmsnap_plugin.vm.qemu_help`);
:data:`FLAGS` is QEMU 7.2's list, for when no binary is at hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kvmsnap_plugin.model import QemuOptions

#: QEMU 7.2 options that take no value.
FLAGS = frozenset({
    "S", "snapshot", "nographic", "daemonize", "no-reboot", "no-shutdown", "nodefaults",
    "no-user-config", "nouserconfig", "enable-kvm", "no-hpet", "no-acpi", "no-fd-bootchk",
    "full-screen", "win2k-hack", "usb", "enable-fips", "only-migratable", "xen-attach",
    "preconfig", "s", "semihosting", "alt-grab", "ctrl-grab", "rtc-td-hack", "no-frame",
    "sdl", "curses", "portrait", "enable-sync-profile", "no-quit", "h", "help", "version",
    "mem-prealloc", "singlestep", "async-teardown", "xen-domid-restrict", "audio-help",
})
#: the column QEMU's ``-help`` starts an option's description in
HELP_COLUMN = 16
#: options QEMU accepts without listing them in ``-help`` (measured on 7.2): ``-M`` is
#: ``-machine``; ``-qtest`` is left out on purpose, a clone has no test harness
UNLISTED_WITH_VALUE = frozenset({"M"})


def escape(value: object) -> str:
    """A value for QEMU's key=value syntax: a literal comma is written as two."""
    return str(value).replace(",", ",,")


@dataclass
class Option:
    """One option: ``name`` without dashes (``""`` for a positional image), ``value``."""

    name: str
    value: str | None = None

    def argv(self) -> list[str]:
        if not self.name:
            return [self.value or ""]
        return [f"-{self.name}"] if self.value is None else [f"-{self.name}", self.value]


def parse_argv(argv: list[str], known: QemuOptions | None = None) -> tuple[str, list[Option]]:
    """Split a QEMU command line into its program and options (``known``: the binary's)."""
    program, rest = argv[0], argv[1:]
    options: list[Option] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-") and len(token) > 1:
            name = token.lstrip("-")
            if _is_flag(name, known) or i + 1 >= len(rest):
                options.append(Option(name))
                i += 1
            else:
                options.append(Option(name, rest[i + 1]))
                i += 2
        else:
            options.append(Option("", token))
            i += 1
    return program, options


def _is_flag(name: str, known: QemuOptions | None) -> bool:
    if known is not None and known.knows(name):
        return name in known.flags
    return name in FLAGS


def parse_help(text: str) -> QemuOptions:
    """The options a QEMU binary's ``-help`` lists, and which of them take a value.

    Each option's lines start ``-name`` and, when it takes one, its value right after
    (``-m [size=]megs``, ``-dtb    file``); the description starts at column 16, or after
    one space once a long name has passed that column (``-async-teardown enable ...``,
    where a value looks like a metavariable instead: ``-watchdog-action reset|...``).
    Names come alone, paired (``-fda/-fdb``) or as ``-h or -help``.
    """
    flags: set[str] = set()
    with_value: set[str] = set()
    for line in text.splitlines():
        match = re.match(r"(--?[A-Za-z][\w-]*(?:(?:/| or )-[\w-]+)*)(.*)$", line)
        if not match:
            continue
        head, rest = match.groups()
        names = {name.lstrip("-") for name in re.split(r"/| or ", head)}
        (with_value if _help_takes_value(len(head), rest) else flags).update(names)
    if "machine" in with_value:
        with_value |= UNLISTED_WITH_VALUE
    return QemuOptions(frozenset(flags - with_value), frozenset(with_value))


def _help_takes_value(head_length: int, rest: str) -> bool:
    text = rest.lstrip(" ")
    if not text:
        return False  # the description is on the next line
    if head_length + len(rest) - len(text) < HELP_COLUMN:
        return True
    return bool(re.search(r"[][<>|=,:]", text.split()[0]))


def option_fields(value: str, implied: str) -> dict[str, str]:
    """An option's fields, from QEMU's JSON syntax (libvirt's) or key=value syntax.

    Values are strings either way (JSON booleans as ``on``/``off``), enough to match on.
    """
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return {k: _scalar(v) for k, v in data.items() if not isinstance(v, dict | list)}
    return {k: v or "" for k, v in KeyVal.parse(value, implied=implied).pairs}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "" if value is None else str(value)


def build_argv(program: str, options: list[Option]) -> list[str]:
    argv = [program]
    for option in options:
        argv += option.argv()
    return argv


@dataclass
class KeyVal:
    """A parsed QemuOpts string; keeps key order so rewriting changes only what it must."""

    pairs: list[tuple[str, str | None]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, implied: str | None = None) -> KeyVal:
        parts, current, i = [], "", 0
        while i < len(text):
            char = text[i]
            if char == ",":
                if text[i + 1:i + 2] == ",":
                    current += ","
                    i += 2
                    continue
                parts.append(current)
                current = ""
            else:
                current += char
            i += 1
        parts.append(current)
        pairs: list[tuple[str, str | None]] = []
        for index, part in enumerate(parts):
            key, sep, value = part.partition("=")
            if not sep:
                if index == 0 and implied:
                    pairs.append((implied, part))
                else:
                    pairs.append((part, None))
            else:
                pairs.append((key, value))
        return cls(pairs)

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.pairs:
            if k == key:
                return v
        return default

    def set(self, key: str, value: str) -> None:
        for index, (k, _) in enumerate(self.pairs):
            if k == key:
                self.pairs[index] = (key, value)
                return
        self.pairs.append((key, value))

    def drop(self, *keys: str) -> None:
        self.pairs = [(k, v) for k, v in self.pairs if k not in keys]

    def keys(self) -> list[str]:
        return [k for k, _ in self.pairs]

    def render(self, implied: str | None = None) -> str:
        out = []
        for index, (k, v) in enumerate(self.pairs):
            if v is None:
                out.append(k)
            elif index == 0 and implied == k:
                out.append(v.replace(",", ",,"))
            else:
                out.append(f"{k}={v.replace(',', ',,')}")
        return ",".join(out)


def parse_blockdev(text: str) -> dict[str, Any]:
    """A -blockdev value as a dict, from JSON or dotted key=value syntax."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    result: dict[str, Any] = {}
    for key, value in KeyVal.parse(text).pairs:
        target = result
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return result


def render_blockdev(spec: dict[str, Any], like: str = "{") -> str:
    """``spec`` in the syntax of ``like`` (the value it was parsed from): dotted key=value
    stays key=value, because QEMU converts its strings by the schema (``cache.direct=on``
    is a boolean there) while JSON would pass them on as strings and be refused."""
    flat = _dotted(spec)
    if like.lstrip().startswith("{") or flat is None:
        return json.dumps(spec, separators=(",", ":"))
    return ",".join(f"{key}={value.replace(',', ',,')}" for key, value in flat)


def _dotted(spec: dict[str, Any], prefix: str = "") -> list[tuple[str, str]] | None:
    """Nested string values as dotted pairs; None if a value is not a string or a dict."""
    pairs: list[tuple[str, str]] = []
    for key, value in spec.items():
        if isinstance(value, dict):
            inner = _dotted(value, f"{prefix}{key}.")
            if inner is None:
                return None
            pairs += inner
        elif isinstance(value, str):
            pairs.append((f"{prefix}{key}", value))
        else:
            return None
    return pairs
