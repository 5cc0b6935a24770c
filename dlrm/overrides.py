"""Command-line overrides checked before Hydra composes the config, for one-line errors.

Hydra's own messages for these cases name no key or run over several lines: an override its
lexer cannot read (`data.path=/data/day=23`: say how to quote it), a misspelled key
(`trainer.max_stepz=50`: Hydra suggests adding it with `+`, which our validation then rejects;
say which key was meant), and an unknown choice of a config group (`emb=ttt`: Hydra lists every
search path over 15 lines). Values
are checked later, by `dlrm.config.validate`, on the composed config.
"""

from __future__ import annotations

import difflib
import shlex
from pathlib import Path

import yaml


def check_overrides(argv: list[str]) -> str | None:
    """The one-line error for the first command-line override Hydra's lexer cannot read (its own
    message names no key), with the same override quoted; None when all parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue  # flags (-m, --cfg job) and their values
        try:
            parser.parse_override(arg)
        except HydraException as e:  # (the lexer raises it, not OverrideParseException)
            key, _, value = arg.partition("=")
            inner = f'"{value}"' if '"' not in value else "'" + value.replace("'", "\\'") + "'"
            reason = " ".join(str(e).split("See https")[0].split())
            return (
                f"error: cannot read the override {arg!r} ({reason}): a value with "
                f"= # ' [ ] {{ }} , or spaces must be quoted for Hydra, e.g. {shlex.quote(f'{key}={inner}')}"
            )
    return None


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CHECKED_SECTIONS = ("trainer", "data", "emb", "model", "optim")  # where a typo'd key is common


def known_keys(conf_dir: Path = CONF_DIR) -> set[str]:
    """Every dotted key any config file under `conf_dir` can set: config.yaml's, each group
    file's under its group (data/*.yaml -> data.*), `# @package _global_` files' from the root;
    hydra's own settings are left out. A union over every choice (emb=tt's keys and emb=full's)."""
    keys: set[str] = set()
    for path in sorted(conf_dir.rglob("*.yaml")):
        rel = path.relative_to(conf_dir)
        if rel.parts[0] == "hydra":
            continue
        text = path.read_text()
        node = yaml.safe_load(text) or {}  # plain YAML: 4x faster than OmegaConf for ~60 files
        glob_pkg = path.name == "config.yaml" and len(rel.parts) == 1 or "@package _global_" in text.split("\n", 1)[0]
        _add_keys(node, "" if glob_pkg else f"{rel.parts[0]}.", keys)
    return keys


def _add_keys(node: dict, prefix: str, keys: set[str]) -> None:
    """Every dotted key of a config file's YAML `node` under `prefix` into `keys` (not its
    `defaults` list or hydra's settings)."""
    for k, v in node.items():
        if k in ("defaults", "hydra"):
            continue
        keys.add(prefix + str(k))
        if isinstance(v, dict):
            _add_keys(v, f"{prefix}{k}.", keys)


def check_override_keys(argv: list[str], keys: set[str] | None = None) -> str | None:
    """The one-line error for an override of a trainer/data/emb/model/optim key that no config
    file has (a typo: Hydra's own message is 6 lines and suggests adding it with `+`, which
    `validate` rejects for these sections), naming the closest key; None when all are known.
    Keys inside a known option (`emb.shapes.C3...`) and `+`/`++`/`~` overrides are left to Hydra
    and `validate`."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key.startswith(("+", "~", "-")) or "." not in key or "/" in key:
            continue
        parts = key.split(".")
        if parts[0] not in CHECKED_SECTIONS:
            continue
        keys = known_keys() if keys is None else keys  # read only when an override needs it (45 ms)
        if key in keys:
            other = _other_choice_only(key, argv)
            if other:
                return other
            continue
        # inside an open option (null or {} in the files: emb.shapes, data.multi_hot): Hydra's call
        if any(_is_open(".".join(parts[:n]), keys) for n in range(2, len(parts))):
            continue
        section = [k for k in keys if k.startswith(parts[0] + ".")]
        close = difflib.get_close_matches(key, section, n=1)
        # no "+key" hint: these sections take only known settings (validate rejects new ones)
        hint = f"did you mean {close[0]}?" if close else f"python -m dlrm.train --cfg job lists the {parts[0]} settings"
        return f"error: {key} is not a setting ({hint})"
    return None


def _chosen(group: str, argv: list[str], conf_dir: Path) -> str | None:
    """The one option of config `group` this command line runs: its `group=X` override, else
    config.yaml's default; None for a sweep over several, or when an experiment may choose it."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == group:
            return value if "," not in value and "(" not in value else None
        if eq and key.lstrip("+").startswith("experiment"):
            return None
    for entry in (yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}).get("defaults", []):
        if isinstance(entry, dict) and group in entry:
            return entry[group]
    return None


def keys_of_choice(group: str, choice: str, conf_dir: Path = CONF_DIR) -> set[str]:
    """The dotted keys `group=choice` can set: its file's and those of the same group's files its
    `defaults` list (emb/hashed.yaml builds on emb/full.yaml)."""
    path = conf_dir / group / f"{choice}.yaml"
    if not path.is_file():
        return set()
    node = yaml.safe_load(path.read_text()) or {}
    keys: set[str] = set()
    _add_keys(node, f"{group}.", keys)
    for base in node.get("defaults", []):
        if isinstance(base, str) and base != "_self_":
            keys |= keys_of_choice(group, base, conf_dir)
    return keys


def _other_choice_only(key: str, argv: list[str]) -> str | None:
    """The one-line error for an `emb.` or `model.` key that exists, but only under another `emb=`
    (`model=`) choice than the one this command runs (Hydra's message is several lines and suggests
    `+key`, which validation then refuses): `model.kernel` under `model=dcnv2`; None otherwise."""
    group = key.split(".")[0]
    if group not in ("emb", "model"):
        return None
    choice = _chosen(group, argv, CONF_DIR)
    if choice is None:
        return None
    own = keys_of_choice(group, choice)
    if key in own:
        return None
    owners = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if key in keys_of_choice(group, p.stem))
    nested = sorted(k for k in own if k.endswith("." + key.split(".", 1)[1]))
    hint = f"; did you mean {nested[0]}?" if nested else ""
    return f"error: {key} is not a setting of {group}={choice} (it is one of {group}={', '.join(owners)}){hint}"


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The one-line error for an override choosing a config group option that has no file
    (`emb=ttt`, `+experiment=compresion`; each of a sweep's comma-separated choices), naming the
    closest choice and listing them; None when every choice exists. Sweep functions (`glob(...)`,
    `range(...)`) and nested groups (`+experiment/compression_grid=...`) are left to Hydra."""
    for arg in argv:
        key, eq, value = arg.partition("=")
        group = key.lstrip("+")
        if not eq or key.startswith(("~", "-")) or "." in group or "/" in group or "(" in value:
            continue
        folder = conf_dir / group
        if not folder.is_dir():
            continue
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        for choice in (c.strip() for c in value.split(",")):
            if choice and choice != "null" and choice not in choices:
                close = difflib.get_close_matches(choice, choices, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                return f"error: {group}={choice}: no such choice in conf/{group}/ ({hint}choices: {', '.join(choices)})"
    return None


def _is_open(key: str, keys: set[str]) -> bool:
    """A known key with no known keys under it (its default is null or {})."""
    return key in keys and not any(k.startswith(key + ".") for k in keys)
