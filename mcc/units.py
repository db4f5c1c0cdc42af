"""Parsing and printing of sizes (``50GiB``, ``800MB``) and durations (``10s``, ``5m``)."""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["format_duration", "format_size", "human_size", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# Decimal, so that "59ms" is the float nearest 0.059 (59 * 0.001 is 0.059000000000000004,
# and a config written by `mcc config show` must read back to the same values).
_DURATION_UNITS = {
    "": Decimal(1),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_size(value: object) -> int:
    """Turn ``1048576``, ``"1MiB"`` or ``"800MB"`` into a number of bytes.

    Raises:
      ValueError: naming the value, when it is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use e.g. 1048576, '1MiB' or '800MB')")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
            if n == int(n):
                return int(n)
    raise ValueError(f"{value!r} is not a size (use e.g. 1048576, '1MiB' or '800MB')")


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling of ``n`` bytes: ``1MiB``, ``1536KiB``, ``1000``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit.lower()]
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_duration(value: object) -> float:
    """Turn ``10``, ``2.5``, ``"10s"``, ``"500ms"`` or ``"5m"`` into seconds.

    Raises:
      ValueError: naming the value, when it is not a duration.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m and m.group(2) in _DURATION_UNITS:
            return float(Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ValueError(f"{value!r} is not a duration (use e.g. 10, '10s', '500ms' or '5m')")


def format_duration(seconds: float) -> str:
    """``10.0`` -> ``"10s"``, ``0.5`` -> ``"500ms"``, ``300.0`` -> ``"5m"``."""
    if seconds and seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    if seconds and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def human_size(n: float) -> str:
    """A size for people, rounded: ``512 B``, ``1.5 MiB``, ``50.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
