"""Every config key is declared once (a knob: flag, help, unit) and everything that
names keys agrees with it: the flags, the README's reference table and the example
file (issue #14)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcc.cli import build_parser
from mcc.cli.flags import effective_config
from mcc.config import (
    Config,
    Entry,
    config_as_raw,
    config_to_toml,
    entries,
    load_config,
    structure_config,
    with_overrides,
)
from mcc.config.check import _LIMIT_FLOORS
from mcc.config.knobs import knob
from mcc.config.reference import BEGIN, END, readme_table, rewrite
from mcc.errors import ConfigError
from mcc.units import format_duration, format_size

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "fixtures" / "mcc.example.toml"
ENTRIES = list(entries(Config))

# Commands whose flags are the config's: each takes every knob's flag.
CONFIG_COMMANDS = ("serve", "config show", "verify", "stats", "warm", "purge")


def _raw_at(raw: dict[str, Any], entry: Entry) -> list[Any]:
    """The values a plain config holds for one key (one per table of an array)."""
    if entry.table is None:
        return [raw[entry.key]] if entry.key in raw else []
    tables = raw.get(entry.table, [] if entry.array else {})
    return [t[entry.name] for t in (tables if entry.array else [tables]) if entry.name in t]


def test_every_key_is_a_knob() -> None:
    keys = {e.key for e in ENTRIES}
    for name in ("block_size", "limits.max_ranges", "drives.max_size", "refresh_patterns"):
        assert name in keys
    flags = [e.knob.flag for e in ENTRIES]
    assert len(flags) == len(set(flags)), "two keys share a flag"


def test_a_field_without_a_knob_is_refused() -> None:
    @attrs.frozen
    class Bad:
        ok: int = knob(1, flag="--ok", help="fine")
        plain: int = 2

    with pytest.raises(TypeError, match="'plain' is declared without knob"):
        list(entries(Bad))


def test_readme_table_is_made_from_the_knobs() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text
    table = text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert table == readme_table(), "run: python -m mcc.config.reference README.md"
    assert rewrite(text) == text
    for entry in ENTRIES:
        assert f"`{entry.knob.flag}" in table, entry.key


def test_example_file_sets_every_key() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    load_config(EXAMPLE)  # and every key in it is known
    missing = [e.key for e in ENTRIES if not _raw_at(raw, e)]
    assert missing == []


def _parser_options(command: str) -> set[str]:
    parser = build_parser()
    sub: Any = parser
    for word in command.split():
        action = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction")
        sub = action.choices[word]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_knob_has_its_flag(command: str) -> None:
    options = _parser_options(command)
    assert {e.knob.flag for e in ENTRIES} <= options


def test_serve_has_no_flag_without_a_knob() -> None:
    extra = _parser_options("serve") - {e.knob.flag for e in ENTRIES}
    assert extra == {"-h", "--help", "--config", "-c"}


def _sample(entry: Entry, default: Any) -> list[str]:
    """A flag's text that differs from the default, made from the knob's kind and unit."""
    k = entry.knob
    if k.kind == "off":
        return []
    if entry.choices:
        return [next(c for c in entry.choices if c != default)]
    if k.unit == "size":
        return [format_size(default * 2)]
    if k.unit == "duration":
        return [format_duration(default * 2)]
    by_metavar = {
        "HOST:PORT": ["127.0.0.1:18000", "[::1]:18001"],
        "FILE": ["/etc/mcc/a.pem"],
        "TOKEN": ["0123456789abcdef-token"],
        "DIR": ["cache-a", "cache-b"],
        "PATTERN": ["mirror.example.org", "*.example.net"],
        "HOST=CANONICAL": ["a.example.org=b.example.org"],
        "URL": ["http://up.example.org:8080"],
        "NAME": ["node-7"],
        "PATH": ["access.log"],
        "PATTERN=SPEC": ["*.deb=immutable", "*/InRelease=max_age=5m,min_age=30s"],
    }
    if entry.type is int:  # a count (N, BYTES_PER_S ...)
        return [str(default + 1)]
    assert k.metavar is not None
    values = by_metavar[k.metavar]
    return values if k.kind != "value" else values[:1]


def test_every_flag_sets_its_key(tmp_path: Path) -> None:
    # every flag at once, each with a value unlike the default: each key must change
    defaults = config_as_raw(Config())
    argv = ["config", "show"]
    for entry in ENTRIES:
        default = entry.default
        values = _sample(entry, default)
        if entry.knob.kind in ("append", "pairs", "rules", "drive_dirs"):
            for v in values:
                argv += [entry.knob.flag, v]
        else:
            argv += [entry.knob.flag, *values]
    args = build_parser().parse_args(argv)
    shown = config_as_raw(effective_config(args))
    unchanged = [e.key for e in ENTRIES if _raw_at(shown, e) == _raw_at(defaults, e)]
    assert unchanged == []


def _knob_values() -> st.SearchStrategy[dict[str, Any]]:
    """Overrides of every duration, limit and choice, as a file would set them."""
    floors = dict(_LIMIT_FLOORS)
    tables: dict[str, dict[str, st.SearchStrategy[Any]]] = {}
    top: dict[str, st.SearchStrategy[Any]] = {}
    for e in ENTRIES:
        if e.array:
            continue
        if e.knob.unit == "duration":
            ms = st.one_of(st.integers(1, 1000), st.integers(1, 10**8))
            strategy: st.SearchStrategy[Any] = ms.map(lambda n: n / 1000)
        elif e.table == "limits":
            low = floors[e.name]
            strategy = st.integers(low, low + 2**40)
        elif e.choices:
            strategy = st.sampled_from(e.choices)
        else:
            continue
        if e.table is None:
            top[e.key] = strategy
        else:
            tables.setdefault(e.table, {})[e.name] = strategy
    return st.fixed_dictionaries(
        {**top, **{t: st.fixed_dictionaries({}, optional=kv) for t, kv in tables.items()}}
    )


@settings(max_examples=200)
@given(_knob_values())
def test_what_config_show_writes_reads_back_the_same(raw: dict[str, Any]) -> None:
    try:
        config = load_config(overrides=raw)
    except ConfigError:  # a value out of its range: refused the same way on both paths
        with pytest.raises(ConfigError):
            with_overrides(Config(), raw)
        return
    assert structure_config(tomllib.loads(config_to_toml(config))) == config
    assert with_overrides(Config(), raw) == config
