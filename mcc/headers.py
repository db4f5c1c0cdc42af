"""Pure parsers for the response headers the engine reads from upstream."""

from __future__ import annotations

import re

__all__ = ["parse_cache_control", "parse_content_range", "parse_unsatisfied_range"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/n`` -> (a, b, n); ``bytes a-b/*`` -> (a, b, None); else None."""
    if value is None:
        return None
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if b < a or (total is not None and b >= total):
        return None
    return a, b, total


def parse_unsatisfied_range(value: str | None) -> int | None:
    """``bytes */n`` (a 416's Content-Range) -> n; else None."""
    if value is None:
        return None
    m = _UNSATISFIED.match(value.strip())
    return int(m.group(1)) if m else None


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """``max-age=60, no-store`` -> ``{"max-age": "60", "no-store": None}`` (names lower-cased)."""
    out: dict[str, str | None] = {}
    if not value:
        return out
    for part in value.split(","):
        name, sep, arg = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return out
