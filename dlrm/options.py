"""The one mechanism that checks config options: a declared schema per config section.

A leaf module (it imports nothing of dlrm), so embedding backends can declare their own options
without an import cycle: `dlrm.config` holds the schemas of the other groups and `validate()`.

Example::

    SCHEMA = {"store": Opt(str, choices=("host", "disk")), "cache_fraction": Opt(float, min=0)}
    check_options(cfg.emb, SCHEMA, "emb")   # ConfigError: emb.store='dsk': choose one of [...]
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """Bad configuration: the message is one line that names the key (e.g. `emb.store='dsk'`)."""

    __module__ = "dlrm.config"  # its public home (users and sweep logs name dlrm.config.ConfigError)


@dataclass(frozen=True)
class Opt:
    """One option: its type (`int`, `float` = any number, `str`, `bool`, `list`, `dict`), an
    optional minimum (numbers) or set of choices, and whether null is allowed.

    `kind` may be a tuple of types (e.g. `(int, str)`) for options that take either."""

    kind: type | tuple[type, ...]
    min: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    what: str | None = None  # what a value is, for the message (default: from `kind`)

    def check(self, key: str, value: Any) -> None:
        """Raise ConfigError naming `key` if `value` does not fit this option."""
        if value is None:
            if self.nullable:
                return
            raise ConfigError(f"{key}=null: a value is required")
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != any(
                isinstance(c, bool) and c == value for c in self.choices
            ):
                raise ConfigError(f"{key}={value!r}: choose one of {list(self.choices)}")
            return
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if not any(_is(value, k) for k in kinds):
            what = self.what or " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
            raise ConfigError(f"{key}={value!r} must be {what}")
        if self.min is not None and _is(value, float) and value < self.min:
            raise ConfigError(f"{key}={value!r} must be >= {self.min:g}")


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "a list", dict: "a mapping (e.g. {C3: 1000})"}


def _is(value: Any, kind: type) -> bool:
    # bools are ints in Python; an option that wants a number must not accept `true`.
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
    if kind is dict:
        return isinstance(value, Mapping) or type(value).__name__ == "DictConfig"
    return isinstance(value, kind)


def check_options(node: Mapping, schema: Mapping[str, Opt], prefix: str) -> None:
    """Check every key of `node` against `schema`: unknown keys (with a close match suggested),
    types, ranges and choices. Raises ConfigError naming `prefix.key`."""
    dotted = (lambda k: f"{prefix}.{k}") if prefix else str
    for key in node:
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {dotted(near[0])}?)" if near else ""
            raise ConfigError(f"{dotted(key)}: unknown option{hint}; known: {sorted(schema)}")
        schema[key].check(dotted(key), node[key])
