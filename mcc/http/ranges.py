"""Range, If-Range and Content-Range arithmetic (RFC 9110 section 14). Pure functions.

Rules followed:
- A Range header that does not parse is ignored (the whole object, 200): s14.2.
- Unsatisfiable ranges are dropped; when none is left, the answer is 416 with
  ``Content-Range: bytes */LEN``: s14.1.1, s15.5.17.
- Overlapping or adjacent ranges are merged (a server MAY coalesce: s14.2), which also
  bounds how many bytes a multipart answer can repeat.
- More ranges than the configured limit are answered with the whole object (200),
  as a server may ignore a Range it finds excessive: s14.2.
- If-Range: an entity-tag matches only by strong comparison; a date only when it
  equals the object's Last-Modified exactly: s13.1.5.
"""

from __future__ import annotations

import re

import attrs

from ..headers import is_digits

__all__ = [
    "UNSATISFIABLE",
    "ByteRange",
    "content_range",
    "first_byte",
    "if_range_matches",
    "last_byte",
    "parse_range",
]

_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
# Digits beyond this are not a plausible offset; refusing them keeps int() cheap.
_MAX_DIGITS = 19


@attrs.frozen
class ByteRange:
    """The inclusive byte span ``start..end`` of an object."""

    start: int
    end: int

    @property
    def length(self) -> int:
        """Bytes in the span."""
        return self.end - self.start + 1


class _Unsatisfiable:
    def __repr__(self) -> str:
        return "UNSATISFIABLE"


UNSATISFIABLE = _Unsatisfiable()
"""Returned by :func:`parse_range` when no range overlaps the object (answer 416)."""


def parse_range(
    value: str | None, size: int, max_ranges: int = 32
) -> list[ByteRange] | _Unsatisfiable | None:
    """Resolve a Range header against an object of ``size`` bytes.

    Returns:
      None for "send the whole object" (no header, not parseable, too many ranges);
      UNSATISFIABLE for 416; else the merged, sorted ranges (at least one).
    """
    if value is None:
        return None
    unit, sep, specs = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parsed: list[tuple[str, str]] = []
    for spec in specs.split(","):
        if not spec.strip():
            continue  # RFC 9110 s5.6.1: empty list elements are ignored
        m = _SPEC.match(spec)
        if not m or (not m.group(1) and not m.group(2)):
            return None
        a, b = m.group(1), m.group(2)
        if len(a) > _MAX_DIGITS or len(b) > _MAX_DIGITS:
            return None
        if a and b and int(b) < int(a):
            return None
        parsed.append((a, b))
    if not parsed:
        return None
    if len(parsed) > max_ranges:
        return None
    spans: list[ByteRange] = []
    for a, b in parsed:
        if not a:  # suffix: the last n bytes
            n = int(b)
            if n == 0 or size == 0:
                continue
            spans.append(ByteRange(max(0, size - n), size - 1))
        else:
            start = int(a)
            if start >= size:
                continue
            end = size - 1 if not b else min(int(b), size - 1)
            spans.append(ByteRange(start, end))
    if not spans:
        return UNSATISFIABLE
    spans.sort(key=lambda r: r.start)
    merged = [spans[0]]
    for r in spans[1:]:
        last = merged[-1]
        if r.start <= last.end + 1:
            merged[-1] = ByteRange(last.start, max(last.end, r.end))
        else:
            merged.append(r)
    return merged


def if_range_matches(value: str, etag: str | None, last_modified: str | None) -> bool:
    """True when an If-Range validator still names the stored representation."""
    v = value.strip()
    if v.startswith('"') or v.startswith("W/"):
        return (
            etag is not None and not etag.startswith("W/") and not v.startswith("W/") and v == etag
        )
    return last_modified is not None and v == last_modified


def content_range(r: ByteRange, size: int) -> str:
    """The Content-Range value for ``r`` of an object of ``size`` bytes."""
    return f"bytes {r.start}-{r.end}/{size}"


def first_byte(range_header: str | None) -> int:
    """The first byte a Range header asks for (for discovery's block hint); 0 if unsure."""
    if not range_header or "=" not in range_header:
        return 0
    first = range_header.split("=", 1)[1].split(",")[0].strip()
    start = first.split("-")[0].strip()
    return int(start) if is_digits(start) and len(start) < 19 else 0


def last_byte(range_header: str | None) -> int | None:
    """The last byte of a Range header's only range (how far a discovery may ask
    beyond the first block); None when unsure, open-ended, a suffix or several."""
    if not range_header or "=" not in range_header:
        return None
    spec = range_header.split("=", 1)[1]
    if "," in spec or "-" not in spec:
        return None
    start, end = (part.strip() for part in spec.split("-", 1))
    if not (is_digits(start) and is_digits(end)) or len(start) >= 19 or len(end) >= 19:
        return None
    return int(end) if int(end) >= int(start) else None
