"""Reading and writing the configuration: cattrs from plain mappings (as TOML gives),
tomli-w back to TOML.

Flags win over the file, which wins over the embedded defaults. A bad value is
reported as one line per problem, ``key: value reason``, through
:class:`~mcc.errors.ConfigError`, every problem in one round. Which keys are sizes or
durations comes from the knobs (:mod:`mcc.config.knobs`).
"""

from __future__ import annotations

import json
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
import tomli_w
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from ..errors import ConfigError
from ..policy import RefreshRule
from ..units import format_duration, format_size, parse_duration, parse_size
from .check import check_config
from .knobs import sections, sized_fields
from .model import Config, Drive, Freshness, HostPort, Limits, Timeouts

__all__ = ["config_as_raw", "config_to_toml", "load_config", "structure_config", "with_overrides"]

_LITERAL: object = typing.Literal
_TUPLE: object = tuple
# keys holding one table: merged key by key when overridden (arrays of tables are replaced)
_TABLES = tuple(name for name, (_, array) in sections(Config).items() if not array)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def size(value: object, _: type) -> int:
        return parse_size(value)

    def seconds(value: object, _: type) -> float:
        return parse_duration(value)

    def strict_int(value: object, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        return value

    def strict_bool(value: object, _: type) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value

    def strict_str(value: object, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value

    def literal(value: object, kind: Any) -> object:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    def homogeneous_tuple(value: object, kind: Any) -> tuple[Any, ...]:
        # a TOML string is iterable: without this, "mirror" became six one-letter hosts
        elem = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            noun = "tables" if attrs.has(elem) and elem is not HostPort else "strings"
            raise ValueError(f"expected a list of {noun}, got {_describe(value)}")
        out: list[Any] = []
        errors: list[Exception] = []
        for i, item in enumerate(value):
            try:
                out.append(conv.structure(item, elem))
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"Structuring {kind} @ index {i}", i, elem),
                ]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {kind!r}", errors, kind)
        return tuple(out)

    def string_table(value: object, _: type) -> dict[str, str]:
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a table of strings, got {_describe(value)}")
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{bad[0]!r}: expected a string, got {_describe(value[bad[0]])}")
        return dict(value)

    def table(fn: Any) -> Any:
        def structure(value: object, kind: type) -> Any:
            if not isinstance(value, Mapping):
                raise ValueError(f"expected a table, got {_describe(value)}")
            return fn(value, kind)

        return structure

    def make(cls: type) -> Any:
        # the knobs say which keys are sizes; every float is a duration
        sized: dict[str, Any] = {
            name: cattrs.gen.override(struct_hook=size) for name in sized_fields(cls)
        }
        return table(cattrs.gen.make_dict_structure_fn(cls, conv, **sized))

    conv.register_structure_hook_func(
        lambda t: typing.get_origin(t) is _TUPLE and typing.get_args(t)[1:] == (...,),
        homogeneous_tuple,
    )
    conv.register_structure_hook_func(lambda t: t == Mapping[str, str], string_table)
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is _LITERAL, literal)
    conv.register_structure_hook(HostPort, lambda v, _: HostPort.parse(v))
    conv.register_structure_hook(Path, lambda v, _: Path(strict_str(v, str)))
    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(bool, strict_bool)
    conv.register_structure_hook(str, strict_str)
    conv.register_structure_hook(float, seconds)
    for cls in (Drive, Limits, Timeouts, Freshness, RefreshRule):
        conv.register_structure_hook(cls, make(cls))
    # last: Config's structuring function captures the hooks of its nested classes
    conv.register_structure_hook(Config, make(Config))
    return conv


def _describe(value: object) -> str:
    """``a string "mirror"``, ``an integer 5``: what a config value was, for messages."""
    if isinstance(value, str):
        return f"a string {json.dumps(value)}"
    if isinstance(value, bool):
        return f"a boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a number {value}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{type(value).__name__} {value}"


_converter = _make_converter()


def _flatten_errors(exc: BaseException, path: str) -> list[str]:
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        out: list[str] = []
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "name")), None)
            index = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "index")), None)
            if note is not None:
                sub_path = f"{path}.{note.name}" if path else note.name
            elif index is not None:
                sub_path = f"{path}[{index.index}]"
            else:
                sub_path = path
            out += _flatten_errors(sub, sub_path)
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        prefix = f"{path}." if path else ""
        return [f"{prefix}{k}: unknown key" for k in sorted(exc.extra_fields)]
    if isinstance(exc, KeyError):
        return [f"{path}.{exc.args[0]}: required key is missing"]
    message = str(exc) if isinstance(exc, ValueError) else f"has the wrong type ({exc})"
    return [f"{path or 'config'}: {message}"]


def load_config(
    path: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Build the effective config: defaults, then the TOML file, then ``overrides``.

    Args:
      path: a TOML file, or None for the embedded defaults.
      overrides: keys as in the file (``"timeouts": {"read": 5}``); they win. The
        ``timeouts``, ``limits`` and ``freshness`` tables are merged key by key; every other key,
        lists and ``canonical_hosts`` included, is replaced whole.

    Returns:
      The checked, frozen :class:`Config`.

    Raises:
      ConfigError: one line per problem, naming the key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError([f"config: cannot read {str(path)!r}: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config: {str(path)!r} is not valid TOML: {exc}"]) from None
    return structure_config(_merged(raw, overrides or {}))


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """``config`` with some keys changed, merged as :func:`load_config` merges them (no
    TOML in between: the config's plain values, merged, structured and checked again).

    Raises:
      ConfigError: one line per problem, naming the key.
    """
    if not overrides:
        return config
    return structure_config(_merged(config_as_raw(config), overrides))


def _merged(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key, value in overrides.items():
        if key in _TABLES and isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def structure_config(raw: Mapping[str, Any]) -> Config:
    """Turn a plain mapping (as read from TOML) into a checked Config.

    Raises:
      ConfigError: one line per problem, naming the key.
    """
    try:
        config = _converter.structure(dict(raw), Config)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError) as exc:
        problems = _flatten_errors(exc, "")
    else:
        problems = check_config(config)
        if problems:
            raise ConfigError(problems)
        return config
    # Report every problem in one round: drop the keys whose type is wrong, so that
    # the rest can be structured and range-checked too.
    bad = {_key_of(p) for p in problems}
    rest = _without(raw, bad)
    try:
        partial = _converter.structure(rest, Config)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError):
        raise ConfigError(problems) from None
    dropped = {k.split(".")[0] for k in bad if "." not in k}
    for line in check_config(partial):
        key = _key_of(line)
        if key not in bad and key.split(".")[0] not in dropped:
            problems.append(line)
    raise ConfigError(problems)


def _key_of(problem: str) -> str:
    """The key a problem line names: ``limits.max_ranges`` or ``listen`` (indexes and
    anything below a list dropped: the whole list is set aside)."""
    key = problem.split(":", 1)[0]
    return key.split("[", 1)[0] if "[" in key else key


def _without(raw: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    out = dict(raw)
    for key in keys:
        table, dot, sub = key.partition(".")
        if dot and isinstance(out.get(table), Mapping):
            out[table] = {k: v for k, v in out[table].items() if k != sub}
        else:
            out.pop(table, None)
    return out


def config_as_raw(config: Config, *, human: bool = False) -> dict[str, Any]:
    """The config as plain values (strings, numbers, lists, tables) that
    :func:`structure_config` turns back into an equal Config. Unset keys are left out.
    With ``human``, sizes and durations are strings such as ``"1MiB"`` and ``"10s"``."""
    raw: dict[str, Any] = _plain(config, human)
    return raw


def _plain(obj: Any, human: bool) -> Any:
    out: dict[str, Any] = {}
    sized = set(sized_fields(type(obj)))
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if value is None:
            continue  # TOML has no null: an unset key is left out
        if human and field.name in sized:
            out[field.name] = format_size(value)
        else:
            out[field.name] = _plain_value(value, human)
    return out


def _plain_value(value: Any, human: bool) -> Any:
    if attrs.has(type(value)) and not isinstance(value, HostPort):
        return _plain(value, human)
    if isinstance(value, (HostPort, Path)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain_value(v, human) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_value(v, human) for k, v in value.items()}
    if isinstance(value, float) and human:
        return format_duration(value)
    return value


def config_to_toml(config: Config) -> str:
    """The config as TOML (written with tomli-w) that :func:`load_config` reads back to an
    equal Config; sizes and durations as ``"1MiB"`` and ``"10s"``, unset keys left out."""
    return tomli_w.dumps(config_as_raw(config, human=True))
