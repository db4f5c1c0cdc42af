"""The config flags of every subcommand, made from the knobs (:mod:`mcc.config.knobs`),
and the effective config: defaults, then ``--config``, then flags."""

from __future__ import annotations

import argparse
import functools
import tomllib
from pathlib import Path
from typing import Any

from ..config import Config, Entry, config_as_raw, entries, load_config
from ..config.knobs import shown_default
from ..errors import ConfigError

__all__ = ["add_config_flags", "effective_config", "flag_overrides"]

_DEST = "cfg:"  # argparse dest of a knob's flag: "cfg:" + its dotted key
_REPEATABLE = ("append", "pairs", "rules", "drive_dirs")
_NO_DEFAULT = ("unset", "[]", "{}", '""')  # said in --help as nothing


def _flag_options(entry: Entry) -> dict[str, Any]:
    """The argparse options of a knob's flag."""
    knob = entry.knob
    text = knob.help
    default = shown_default(entry)
    if knob.kind != "off" and default not in _NO_DEFAULT:
        if text.endswith(")"):  # "... (repeatable)" -> "... (repeatable; default 4)"
            text = text[:-1] + f"; default {default})"
        else:
            text += f" (default {default})"
    options: dict[str, Any] = {"dest": _DEST + entry.key, "help": text.replace("%", "%%")}
    if knob.kind == "off":
        return {**options, "action": "store_true", "default": None}
    if knob.kind in _REPEATABLE:
        options["action"] = "append"
    if entry.choices:
        options["choices"] = list(entry.choices)
    else:
        options["metavar"] = entry.metavar
    if entry.type is int and knob.unit is None:
        options["type"] = int
    return options


@functools.cache
def _all_flag_options() -> tuple[tuple[str, dict[str, Any]], ...]:
    # made once: every subcommand takes the same flags
    return tuple((e.knob.flag, _flag_options(e)) for e in entries(Config))


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per knob."""
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="TOML config file")
    for flag, options in _all_flag_options():
        p.add_argument(flag, **options)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as config keys (tables as dicts). Drive flags are left to
    :func:`effective_config`, which needs the file's drives."""
    out: dict[str, Any] = {}
    for entry in entries(Config):
        value = getattr(args, _DEST + entry.key, None)
        if value is None or entry.array:
            continue
        kind = entry.knob.kind
        if kind == "off":
            value = False
        elif kind == "pairs":
            value = _pairs(entry.key, value)
        elif kind == "rules":
            value = [_refresh_rule(item) for item in value]
        if entry.table is not None:
            out.setdefault(entry.table, {})[entry.name] = value
        else:
            out[entry.key] = value
    return out


def _pairs(key: str, items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        host, sep, canon = item.partition("=")
        if not sep:
            raise ConfigError([f"{key}: {item!r} is not HOST=CANONICAL"])
        pairs[host] = canon
    return pairs


def _refresh_rule(item: str) -> dict[str, Any]:
    """``*.deb=immutable`` or ``*/InRelease=max_age=5m,min_age=30s`` -> a rule table."""
    match, sep, spec = item.partition("=")
    if not sep or not match or not spec:
        raise ConfigError([f"refresh_patterns: {item!r} is not PATTERN=SPEC"])
    if spec == "immutable":
        return {"match": match, "immutable": True}
    rule: dict[str, Any] = {"match": match}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if key not in ("max_age", "min_age") or not eq:
            raise ConfigError(
                [f"refresh_patterns: {part!r} in {item!r} is not max_age=... or min_age=..."]
            )
        rule[key] = value
    return rule


def _array_overrides(
    given: list[tuple[Entry, Any]], file_tables: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """An array of tables (``drives``) as its flags change it: a ``drive_dirs`` flag
    replaces the tables, an ``each_drive`` flag sets its key in every one."""
    tables = [dict(t) for t in file_tables]
    for entry, value in given:
        if entry.knob.kind == "drive_dirs":
            tables = [{entry.name: str(v)} for v in value]
    for entry, value in given:
        if entry.knob.kind == "each_drive":
            tables = [{**t, entry.name: value} for t in tables]
    return tables


def effective_config(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config``, then flags.

    Raises:
      ConfigError: one line per problem.
    """
    overrides = flag_overrides(args)
    arrays: dict[str, list[tuple[Entry, Any]]] = {}
    for entry in entries(Config):
        value = getattr(args, _DEST + entry.key, None)
        if entry.array and entry.table is not None and value is not None:
            arrays.setdefault(entry.table, []).append((entry, value))
    for table, given in arrays.items():
        file_tables: list[dict[str, Any]] = config_as_raw(Config())[table]
        if args.config is not None:
            try:
                with open(args.config, "rb") as f:
                    file_tables = tomllib.load(f).get(table, file_tables)
            except (OSError, tomllib.TOMLDecodeError):
                pass  # load_config below reports the unreadable file
        overrides[table] = _array_overrides(given, file_tables)
    return load_config(args.config, overrides)
