"""The secrets a clone needs, kept off every command line kvmsnap starts.

A parent's ``-object secret`` gives its data inline (``data=``) or names a file. The clone
gets the same secret object reading a private file in the run's directory (0600, in a
0700 directory), written at fork time: inline data would otherwise sit in the clone's
``/proc/PID/cmdline`` for every local user to read (the parent's own command line is its
owner's business). libvirt's ``-object secret,...,file=.../master-key.aes`` names a file that
vanishes with the domain, so the clone reads a copy taken at fork time as well.
:func:`secret_for_clone` rewrites the option (pure, for the plan);
:func:`write_clone_secrets` writes the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from kvmsnap_plugin.errors import VMError
from kvmsnap_plugin.paths import safe_name
from kvmsnap_plugin.vm.qemu_args import KeyVal, option_fields, parse_argv

#: libvirt's per-run key for the secrets it hands QEMU (in the domain's runtime directory)
MASTER_KEY = "master-key.aes"
SECRET_TYPE = "secret"


def secret_for_clone(value: str, workdir: Path) -> str:
    """The clone's version of one ``-object``: secrets read from the run's private files."""
    if master_key_of(value):
        return _with_file(value, clone_master_key(workdir))
    secret_id = _inline_secret_id(value)
    if secret_id is None:
        return value
    return _with_file(value, inline_secret_file(workdir, secret_id), drop="data")


def write_clone_secrets(argv: Sequence[str], workdir: Path, root: Path = Path("/")) -> list[Path]:
    """Write every file :func:`secret_for_clone` names, while the parent still runs."""
    written = []
    for option in parse_argv(list(argv))[1]:
        value = option.value or ""
        if option.name != "object":
            continue
        secret_id = _inline_secret_id(value)
        if secret_id is not None:
            data = str(_fields(value)["data"]).encode()
            written.append(_write_private(inline_secret_file(workdir, secret_id), data))
        elif master_key_of(value):
            written.append(copy_master_key(argv, workdir, root))
    return written


def inline_secret_file(workdir: Path, secret_id: str) -> Path:
    return workdir / f"secret-{safe_name(secret_id)}"


def master_key_of(value: str) -> Path | None:
    """The libvirt master key file a ``-object secret`` reads, if that is what it is."""
    fields = option_fields(value, "qom-type")
    path = fields.get("file") or ""
    if fields.get("qom-type") == SECRET_TYPE and Path(path).name == MASTER_KEY:
        return Path(path)
    return None


def clone_master_key(workdir: Path) -> Path:
    return workdir / MASTER_KEY


def copy_master_key(argv: Sequence[str], workdir: Path, root: Path = Path("/")) -> Path | None:
    """Copy the parent's master key for the clone (0600), while the domain still runs.

    libvirt deletes the domain's runtime directory when the domain stops; the clone starts
    later and must still find the key its secrets are encrypted with. ``root`` is where the
    parent's filesystem is seen from here: ``/proc/PID/root`` reaches a file as the parent
    sees it, also when its libvirtd runs in a mount namespace of its own.
    """
    _, options = parse_argv(list(argv))
    named = next((key for o in options if o.name == "object"
                  for key in [master_key_of(o.value or "")] if key), None)
    if named is None:
        return None
    source = root / str(named).lstrip("/")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise VMError(f"cannot copy the domain's master key {source}: {exc.strerror}",
                      "run kvmsnap as root on the VM's host") from None
    return _write_private(clone_master_key(workdir), data)


def _inline_secret_id(value: str) -> str | None:
    """The id of a ``-object secret`` that carries its data inline, else None."""
    fields = _fields(value)
    if fields.get("qom-type") != SECRET_TYPE or fields.get("data") is None:
        return None
    return str(fields.get("id") or "")


def _fields(value: str) -> dict[str, object]:
    if value.lstrip().startswith("{"):
        return json.loads(value)
    return dict(KeyVal.parse(value, implied="qom-type").pairs)


def _with_file(value: str, path: Path, drop: str | None = None) -> str:
    if value.lstrip().startswith("{"):
        spec = json.loads(value)
        spec.pop(drop or "", None)
        spec["file"] = str(path)
        return json.dumps(spec, separators=(",", ":"))
    opts = KeyVal.parse(value, implied="qom-type")
    if drop:
        opts.drop(drop)
    opts.set("file", str(path))
    return opts.render(implied="qom-type")


def _write_private(path: Path, data: bytes) -> Path:
    """A new 0600 file (a leftover of an earlier run in its place is replaced, not followed)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path
