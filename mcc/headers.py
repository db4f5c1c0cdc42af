"""Pure parsers for the response headers the engine reads from upstream."""

from __future__ import annotations

import re

__all__ = [
    "HOP_BY_HOP",
    "canonical_name",
    "is_digits",
    "parse_cache_control",
    "parse_content_range",
    "parse_unsatisfied_range",
]

# RFC 9110 s7.6.1: hop-by-hop fields, meaningful for one connection only: never
# stored nor passed on (nor any field that Connection names).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authentication-info",
        "proxy-authorization",
        "proxy-connection",  # not standard, but sent by old clients and proxies
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")

# Header names whose conventional spelling is not plain Title-Case (RFC 9110 s5.1 says
# names are case-insensitive, but some clients look them up case-sensitively:
# Delivery Optimization reads "Content-Length" and "Content-Range" that way). The
# spellings are those of the IANA HTTP Field Name Registry and what nginx/IIS send.
_SPECIAL_NAMES: dict[str, str] = {
    "etag": "ETag",
    "www-authenticate": "WWW-Authenticate",
    "content-md5": "Content-MD5",
    "content-id": "Content-ID",
    "te": "TE",
    "dnt": "DNT",
    "x-xss-protection": "X-XSS-Protection",
    "x-ua-compatible": "X-UA-Compatible",
    "x-dns-prefetch-control": "X-DNS-Prefetch-Control",
    "x-msedge-ref": "X-MSEdge-Ref",
    "x-ccc": "X-CCC",
    "x-cid": "X-CID",
    "sourcemap": "SourceMap",
    "nel": "NEL",
}
_canonical_memo: dict[str, str] = {}
# Distinct names memoised; headers forwarded from upstream are bounded by this.
_CANONICAL_MEMO_MAX = 4096


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
    for part in _split_list(value):
        name, sep, arg = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return out


def _split_list(value: str) -> list[str]:
    """The members of a comma list, a comma inside a quoted string not splitting
    (``no-cache="a, b"``, RFC 9110 s5.6.1); linear in the value's length."""
    parts: list[str] = []
    start, quoted = 0, False
    for i, c in enumerate(value):
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def canonical_name(name: str) -> str:
    """The conventional spelling of a header name: ``etag`` -> ``ETag``,
    ``content-length`` -> ``Content-Length``, anything else Title-Case per dash."""
    known = _canonical_memo.get(name)
    if known is not None:
        return known
    lower = name.lower()
    out = _SPECIAL_NAMES.get(lower) or "-".join(p[:1].upper() + p[1:] for p in lower.split("-"))
    if len(_canonical_memo) < _CANONICAL_MEMO_MAX:
        _canonical_memo[name] = out
    return out


def is_digits(text: str) -> bool:
    """True when ``text`` is one or more ASCII digits: ``str.isdigit`` alone also takes
    characters like "²" that ``int()`` then refuses (a crash on a header value)."""
    return text.isascii() and text.isdigit()
