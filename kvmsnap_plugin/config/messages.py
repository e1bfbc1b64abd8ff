"""A table checked against its model, and what is wrong with it said on one line.

``/etc/kvmsnap/kvmsnap.toml [archiver.offsite] tags: expected a list of strings, got
"nightly"`` with the fix ``write tags = ["nightly"]``: the file, the table, the key, the
expected type (the field's description in :mod:`kvmsnap_plugin.config.schema`), the value
found, and the key written right.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, TypeVar

from pydantic import ValidationError

from kvmsnap_plugin.config.schema import ModelError, Table
from kvmsnap_plugin.errors import UsageError

T = TypeVar("T", bound=Table)
#: command-line flags whose name is not the key's
FLAGS = {"skip_partitions": "--skip-partition", "min_free": "--min-free"}


def checked(model: type[T], table: Any, where: str, *, flags: bool = False) -> T:
    """``table`` as ``model``, or a UsageError saying where and what is wrong.

    ``where`` names the file and table (``/etc/kvmsnap/kvmsnap.toml [defaults]``); with
    ``flags``, keys are named as command-line options (``--max-pause``).
    """
    if not isinstance(table, dict):
        raise UsageError(f"{where}: expected a table, got {toml(table)}",
                         "write it as a TOML table: [name] followed by key = value lines")
    try:
        return model.model_validate(table)
    except ValidationError as exc:
        raise explain(model, table, where, exc.errors()[0], flags) from None


def explain(model: type[Table], table: dict[str, Any], where: str, error: Any,
            flags: bool) -> UsageError:
    """One pydantic error as a one-line UsageError."""
    name = str(error["loc"][0]) if error["loc"] else ""
    shown = (FLAGS.get(name, "--" + name.replace("_", "-")) if flags else name)
    if error["type"] == "extra_forbidden":
        return unknown_key(name, set(model.model_fields), where)
    field = model.model_fields.get(name)
    if field is None:  # a table-wide error: no key to name
        return UsageError(f"{where}: {error['msg']}", "see `kvmsnap config example`")
    example = field.examples[0] if field.examples else "..."
    if error["type"] == "missing":
        return UsageError(f"{where}: {name} is missing",
                          f"add {name} = {toml(example)}")
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ModelError):
        return UsageError(f"{where} {shown}: {cause.error}", cause.error.hint)
    value = table[name]
    message = f"{where} {shown}: expected {field.description}, got {toml(value)}"
    if flags:
        shown_example = example[0] if isinstance(example, list) else example
        return UsageError(message, f"e.g. {shown} {shown_example}")
    if isinstance(example, list) and isinstance(value, str):
        return UsageError(message, f"write {name} = {toml([value])}")
    return UsageError(message, f"write {name} = {toml(example)}")


def unknown_key(name: str, allowed: set[str], where: str) -> UsageError:
    guess = difflib.get_close_matches(name, allowed, n=1)
    did_you_mean = f"did you mean {guess[0]!r}? " if guess else ""
    return UsageError(f"{where}: unknown key {name!r}",
                      f"{did_you_mean}allowed: {', '.join(sorted(allowed))}")


def toml(value: Any, limit: int = 60) -> str:
    """``value`` as it is written in TOML, cut short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(toml(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{ " + ", ".join(f"{k} = {toml(v, limit)}" for k, v in value.items()) + " }"
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
