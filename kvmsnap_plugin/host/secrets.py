"""What kvmsnap never shows, and how it hides it.

Three kinds of secret reach command lines, program output and error messages: the values
of the environment variables archivers read their passphrases from (known by name);
passwords written into URLs (``sftp://user:pw@host/repo``, ``rest:https://user:pw@host/``,
``iscsi://user%pw@host/...``), which can sit in any repository string or QEMU option; and
the secrets on a QEMU command line (``-object secret,id=s0,data=PW``, libvirt's JSON
secrets, ``password=``, an RBD ``key=``). :func:`shown_command` hides all three wherever
:mod:`kvmsnap_plugin.host.process` logs a command line or quotes one in an error, and
:func:`mask` in every captured stderr; the CLI's :class:`MaskingFormatter` and its error
lines mask whatever else a message quotes. :func:`redacted_argv` also writes the VM's
command line into the archived VM record (and the ``--dry-run`` plan) without its secrets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Environment variables whose values must never be shown.
SECRET_ENV = frozenset({
    "BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_NEW_PASSPHRASE",
    "RESTIC_PASSWORD", "RESTIC_PASSWORD_COMMAND",
    "AWS_SECRET_ACCESS_KEY", "B2_ACCOUNT_KEY", "AZURE_ACCOUNT_KEY",
})

MASK = "***"

#: the password of a URL's user: ``scheme://user:PASSWORD@`` (any scheme, so also the
#: ``https://`` inside restic's ``rest:https://...``), and iSCSI's ``iscsi://user%PASSWORD@``.
#: The password runs to the ``@`` and may hold a ``/`` (people write them unencoded), but
#: not a blank or a quote, so a URL with a port followed by other text is left alone.
URL_PASSWORD = re.compile(
    r"""(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@"']*:|iscsi://[^/\s%@"']*%)[^\s@"']+(?=@)""",
    re.IGNORECASE)


def secret_values(env: Mapping[str, str] | None) -> list[str]:
    """The secret values in ``env`` (and in our own environment), longest first."""
    merged = {**os.environ, **(env or {})}
    values = {v for k, v in merged.items() if k in SECRET_ENV and v}
    return sorted(values, key=len, reverse=True)


def hide_url_passwords(text: str, replacement: str = MASK) -> str:
    """``text`` with every URL's password replaced: ``sftp://user:***@host``."""
    return URL_PASSWORD.sub(lambda m: m["head"] + replacement, text)


def mask(text: str, secrets: Iterable[str]) -> str:
    """``text`` as it may be shown: no secret value, no password in a URL."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return hide_url_passwords(text)


class MaskingFormatter(logging.Formatter):
    """Log lines (tracebacks included) as they may be shown: whatever a message quotes, a
    repository URL or a program's output, loses its URL passwords and secret env values."""

    def format(self, record: logging.LogRecord) -> str:
        return masked(super().format(record))


def masked(text: str) -> str:
    """:func:`mask` with the secret values of our own environment (what kvmsnap prints)."""
    return mask(text, secret_values(None))


def shown_command(argv: Sequence[object], secrets: Iterable[str]) -> str:
    """A command line as it may be logged: :func:`redacted_argv`, then :func:`mask`."""
    return mask(shlex.join(redacted_argv([str(a) for a in argv], MASK)), secrets)


# -- secrets on a command line ------------------------------------------------------------------
#: keys whose value is a secret in any key=value or JSON option (compared on the last part
#: of a dotted key: ``file.password``); the ``*-secret`` / ``*id`` keys beside them name a
#: secret object by its id and are kept
SECRET_KEYS = frozenset({"password", "passwd", "key", "secret-data"})
#: what a ``-object secret`` / ``secret_keyring`` holds besides its id, format and file
SECRET_OBJECT_KEYS = frozenset({"data", "iv"})
#: ``-vnc ...,password=on`` only asks for a password set over the monitor
BOOLEANS = frozenset({"on", "off", "yes", "no", "y", "n", "true", "false"})
#: a secret object in key=value syntax: its type is the implied first key, or qom-type=
SECRET_OBJECT = re.compile(r"^(qom-type=)?secret(_keyring)?(,|$)")
#: one key=value segment of QEMU's syntax and the comma after it (``,,`` is a literal comma)
SEGMENT = re.compile(r"(?P<segment>(?:,,|[^,])*)(?P<comma>,|$)")
#: the key of a legacy RBD filename: ``rbd:pool/image:id=admin:key=SECRET:conf=...``
RBD_KEY = re.compile(r"(?P<head>\brbd:[^,\s]*?:key=)[^:,\s]+")


def redacted_argv(argv: Sequence[str], replacement: str) -> list[str]:
    """``argv`` with every secret value replaced by ``replacement``: the values of secret
    keys in key=value and JSON options, RBD keys and URL passwords. Ids of secret objects,
    paths, formats and everything else a restore needs are kept as they were."""
    return [_redacted(token, replacement) for token in argv]


def _redacted(token: str, replacement: str) -> str:
    token = RBD_KEY.sub(lambda m: m["head"] + replacement, token)
    if token.lstrip().startswith("{"):
        token = _redacted_json(token, replacement)
    elif "=" in token:
        secret_object = bool(SECRET_OBJECT.match(token))
        token = SEGMENT.sub(lambda m: _redacted_segment(m, secret_object, replacement), token)
    return hide_url_passwords(token, replacement)


def _redacted_segment(match: re.Match[str], secret_object: bool, replacement: str) -> str:
    key, equals, value = match["segment"].partition("=")
    if equals and value.lower() not in BOOLEANS and _is_secret(key, secret_object):
        return f"{key}={replacement}{match['comma']}"
    return match[0]


def _is_secret(key: str, secret_object: bool) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in SECRET_KEYS or (secret_object and last in SECRET_OBJECT_KEYS)


def _redacted_json(token: str, replacement: str) -> str:
    """A JSON option (libvirt's) with its secret values replaced; untouched if it has none
    (or is no JSON after all), so the command line stays byte for byte what it was."""
    try:
        data = json.loads(token)
    except json.JSONDecodeError:
        return token
    cleaned = _redacted_node(data, replacement)
    return token if cleaned == data else json.dumps(cleaned, separators=(",", ":"))


def _redacted_node(node: Any, replacement: str) -> Any:
    if isinstance(node, list):
        return [_redacted_node(item, replacement) for item in node]
    if not isinstance(node, dict):
        return node
    secret_object = str(node.get("qom-type", "")).startswith("secret")
    return {key: replacement if _is_secret(key, secret_object) and _is_scalar(value)
            else _redacted_node(value, replacement) for key, value in node.items()}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)
