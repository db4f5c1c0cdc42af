from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcc.config import (
    Config,
    HostPort,
    Limits,
    Timeouts,
    config_as_raw,
    config_to_toml,
    load_config,
    structure_config,
    with_overrides,
)
from mcc.errors import ConfigError
from mcc.units import format_duration, format_size, parse_duration, parse_size

EXAMPLE = Path(__file__).parent.parent / "fixtures" / "mcc.example.toml"


def test_defaults_are_the_embedded_config() -> None:
    c = load_config()
    assert c.listen == (HostPort("127.0.0.1", 8080),)
    assert c.admin_listen == HostPort("127.0.0.1", 8081)
    assert c.block_size == 1024 * 1024
    assert str(c.drives[0].path) == "mcc-cache"
    assert "*.windowsupdate.com" in c.allow_origins


def test_example_config_uses_every_key() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    c = load_config(EXAMPLE)
    assert set(attrs.fields_dict(Config)) == set(raw)
    assert set(raw["timeouts"]) == set(attrs.fields_dict(Timeouts))
    assert set(raw["limits"]) == set(attrs.fields_dict(Limits))
    assert set(raw["drives"][0]) == {"path", "max_size", "min_free"}
    assert c.drives[1].max_size == 800 * 1000**3
    assert c.listen[1] == HostPort("::1", 8080)
    assert c.canonical_hosts["ftp.de.debian.org"] == "deb.debian.org"


def test_show_round_trips() -> None:
    for c in (load_config(), load_config(EXAMPLE)):
        assert structure_config(tomllib.loads(config_to_toml(c))) == c


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"block_size": 1000}, "block_size: 1000 is not a power of two between 64 KiB and 64 MiB"),
        ({"block_size": "128MiB"}, "block_size: 134217728 is not a power of two between"),
        ({"listen": ["nohost"]}, "listen[0]: 'nohost' has no port"),
        ({"log_level": "loud"}, "log_level: 'loud' is not one of debug, info, warning, error"),
        ({"timeouts": {"read": "fast"}}, "timeouts.read: 'fast' is not a duration"),
        ({"limits": {"max_ranges": "x"}}, "limits.max_ranges: 'x' is not an integer"),
        ({"drives": [{"path": "a", "max_size": "5ZB"}]}, "drives[0].max_size: '5ZB' is not a size"),
        ({"parents": ["ftp://x"]}, "parents[0]: 'ftp://x' is not an http:// or https:// URL"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"allow_origins": ["a b"]}, "allow_origins[0]: 'a b' is not a valid host name"),
        ({"node_id": "a b"}, "node_id: 'a b' must be letters"),
        ({"timeouts": {"connect": 0}}, "timeouts.connect: 0.0 must be more than zero"),
    ],
)
def test_bad_values_name_key_value_and_reason(overrides: dict[str, object], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert any(p.startswith(line) for p in info.value.problems), info.value.problems


def test_several_problems_are_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"bogus": 1, "log_level": "x", "limits": {"max_ranges": "y"}})
    assert len(info.value.problems) == 3


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


def test_size_units() -> None:
    assert parse_size("50GiB") == 50 * 1024**3
    assert parse_size("800MB") == 800 * 10**6
    assert parse_size("64 KiB") == 65536
    for bad in ("1.5B", "-1", "1XB", True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("allow_origins", "mirror", 'expected a list of strings, got a string "mirror"'),
        ("listen", "127.0.0.1:18961", 'expected a list of strings, got a string "127.0.0.1:18961"'),
        ("parents", "http://p:8080", 'expected a list of strings, got a string "http://p:8080"'),
        ("parents", 5, "expected a list of strings, got an integer 5"),
        ("drives", "/var/cache/mcc", 'expected a list of tables, got a string "/var/cache/mcc"'),
        ("refresh_patterns", "*.deb", 'expected a list of tables, got a string "*.deb"'),
        ("canonical_hosts", "a=b", 'expected a table of strings, got a string "a=b"'),
        ("limits", 5, "expected a table, got an integer 5"),
    ],
)
def test_a_string_is_never_taken_as_a_list(key: str, value: object, reason: str) -> None:
    # regression: "mirror" was taken as ["m", "i", "r", "r", "o", "r"], and a listen
    # string gave one error per character
    with pytest.raises(ConfigError) as info:
        load_config(overrides={key: value})
    assert info.value.problems == [f"{key}: {reason}"]


def test_type_and_range_problems_come_in_one_round(tmp_path: Path) -> None:
    # regression: max_connections = -5 was reported only after the type errors were fixed
    cfg = tmp_path / "mcc.toml"
    cfg.write_text(
        'allow_origins = "mirror"\nlisten = "127.0.0.1:18961"\nreadahead_blocks = 100\n'
        'block_size = 1000\nbogus = 1\n[limits]\nmax_connections = -5\nmax_ranges = "x"\n'
        "[timeouts]\nread = 0\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert sorted(info.value.problems) == sorted(
        [
            'allow_origins: expected a list of strings, got a string "mirror"',
            'listen: expected a list of strings, got a string "127.0.0.1:18961"',
            "readahead_blocks: 100 is not between 0 and 64",
            "block_size: 1000 is not a power of two between 64 KiB and 64 MiB",
            "bogus: unknown key",
            "limits.max_connections: -5 is less than 1",
            "limits.max_ranges: 'x' is not an integer",
            "timeouts.read: 0.0 must be more than zero",
        ]
    )


def test_access_log_format_is_checked() -> None:
    assert load_config(overrides={"access_log_format": "combined"}).access_log_format == "combined"
    assert load_config().access_log_format == "kv"
    with pytest.raises(ConfigError, match="access_log_format: 'apache' is not one of kv"):
        load_config(overrides={"access_log_format": "apache"})


def test_overrides_apply_to_a_config_without_toml() -> None:
    base = load_config(EXAMPLE)
    changed = with_overrides(
        base, {"timeouts": {"connect": "2s"}, "parents": [], "block_size": "4MiB"}
    )
    assert changed.timeouts.connect == 2.0
    assert changed.timeouts.read == base.timeouts.read  # the table is merged key by key
    assert changed.parents == () and changed.block_size == 4 * 1024 * 1024
    assert (
        attrs.evolve(
            changed, timeouts=base.timeouts, parents=base.parents, block_size=base.block_size
        )
        == base
    )
    assert with_overrides(base, {}) is base
    with pytest.raises(ConfigError, match=r"limits\.max_ranges: 0 is less than 1"):
        with_overrides(base, {"limits": {"max_ranges": 0}})


def test_plain_values_structure_back_to_the_same_config() -> None:
    for c in (load_config(), load_config(EXAMPLE)):
        assert structure_config(config_as_raw(c)) == c
        assert structure_config(config_as_raw(c, human=True)) == c


@given(st.integers(min_value=0, max_value=10**9))
def test_durations_in_ms_read_back_exactly(ms: int) -> None:
    # regression: "59ms" was read as 59 * 0.001 = 0.059000000000000004, so a config
    # written by `mcc config show` did not read back to the same timeouts
    assert parse_duration(f"{ms}ms") == ms / 1000
    assert parse_duration(format_duration(ms / 1000)) == ms / 1000
