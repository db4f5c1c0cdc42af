"""Freshness (RFC 9111 section 4.2): how long a stored response may be used unchecked.

Pure functions over an object's stored headers. Lifetime, in order of precedence:
``s-maxage``, ``max-age``, ``Expires`` minus ``Date``, then the heuristic of section
4.2.2 (10 % of the time since ``Last-Modified``, capped). ``no-cache`` makes the
lifetime zero (revalidate every time). A matching refresh rule from the config (as
Squid's refresh_pattern) then overrides: ``immutable`` never expires, ``max_age``
caps the lifetime, ``min_age`` raises it. When no configured rule matches, the
shipped defaults of :mod:`mcc.refresh_defaults` are tried (package files immutable,
repository indexes rechecked every time).
"""

from __future__ import annotations

import email.utils
import fnmatch
import math
from collections.abc import Sequence

import attrs

from .. import refresh_defaults
from ..headers import parse_cache_control
from .blocks import ObjectMeta

__all__ = [
    "DEFAULT_REFRESH_RULES",
    "RefreshRule",
    "age",
    "freshness_lifetime",
    "is_fresh",
    "matching_rule",
    "may_serve_stale",
]

# RFC 9111 s4.2.2: a heuristic lifetime is a fraction of the time since Last-Modified.
HEURISTIC_FRACTION = 0.1


@attrs.frozen
class RefreshRule:
    """A per-URL override of the computed lifetime. ``match`` is an fnmatch pattern
    tried against the whole URL and against its path (``*.deb``, ``*/InRelease``)."""

    match: str
    max_age: float | None = None
    min_age: float | None = None
    immutable: bool = False

    def matches(self, url: str) -> bool:
        path = url.split("://", 1)[-1].partition("/")[2].split("?")[0]
        return fnmatch.fnmatchcase(url, self.match) or fnmatch.fnmatchcase("/" + path, self.match)


DEFAULT_REFRESH_RULES: tuple[RefreshRule, ...] = (
    *(RefreshRule(p, max_age=refresh_defaults.VOLATILE_MAX_AGE)
      for p in refresh_defaults.VOLATILE_EXCEPTIONS),
    *(RefreshRule(p, immutable=True) for p in refresh_defaults.IMMUTABLE),
    *(RefreshRule(p, max_age=refresh_defaults.VOLATILE_MAX_AGE) for p in refresh_defaults.VOLATILE),
)  # fmt: skip


def matching_rule(url: str, rules: Sequence[RefreshRule] = ()) -> RefreshRule | None:
    """The first of ``rules`` matching ``url``, else the first default rule, else None."""
    for rule in rules:
        if rule.matches(url):
            return rule
    for rule in DEFAULT_REFRESH_RULES:
        if rule.matches(url):
            return rule
    return None


def _header(meta: ObjectMeta, name: str) -> str | None:
    for k, v in meta.headers:
        if k == name:
            return v
    return None


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def freshness_lifetime(
    meta: ObjectMeta, rules: Sequence[RefreshRule] = (), heuristic_max: float = 86400.0
) -> float:
    """Seconds the stored response stays fresh after it was fetched."""
    cc = parse_cache_control(_header(meta, "cache-control"))
    lifetime: float | None = None
    if "no-cache" in cc:
        lifetime = 0.0
    if lifetime is None:
        lifetime = _seconds(cc.get("s-maxage")) if "s-maxage" in cc else None
    if lifetime is None and "max-age" in cc:
        lifetime = _seconds(cc.get("max-age")) or 0.0
    if lifetime is None and _header(meta, "expires") is not None:
        expires = _date(_header(meta, "expires"))
        served = _date(_header(meta, "date")) or meta.fetched_at
        lifetime = max(0.0, expires - served) if expires is not None else 0.0  # bad = stale
    if lifetime is None:
        modified = _date(meta.last_modified)
        served = _date(_header(meta, "date")) or meta.fetched_at
        lifetime = (
            min(heuristic_max, HEURISTIC_FRACTION * max(0.0, served - modified))
            if modified is not None
            else 0.0
        )
    rule = matching_rule(meta.key, rules)
    if rule is not None:
        if rule.immutable:
            return math.inf
        if rule.min_age is not None:
            lifetime = max(lifetime, rule.min_age)
        if rule.max_age is not None:
            lifetime = min(lifetime, rule.max_age)
    return lifetime


def age(meta: ObjectMeta, now: float) -> float:
    """The response's current age: upstream's Age when fetched, plus time since."""
    return (_seconds(_header(meta, "age")) or 0.0) + max(0.0, now - meta.fetched_at)


def is_fresh(
    meta: ObjectMeta, now: float, rules: Sequence[RefreshRule] = (), heuristic_max: float = 86400.0
) -> bool:
    """True when the stored response may be served without asking upstream."""
    return age(meta, now) < freshness_lifetime(meta, rules, heuristic_max)


def may_serve_stale(
    meta: ObjectMeta,
    now: float,
    max_stale: float,
    rules: Sequence[RefreshRule] = (),
    heuristic_max: float = 86400.0,
) -> bool:
    """True when a stale response may be served because upstream failed (stale-if-error,
    RFC 5861): not must-revalidate / proxy-revalidate / s-maxage (which implies
    proxy-revalidate, RFC 9111 s5.2.2.10), and stale for no longer than allowed."""
    cc = parse_cache_control(_header(meta, "cache-control"))
    if "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc:
        return False
    allowed = max_stale
    if "stale-if-error" in cc:
        allowed = min(max_stale, _seconds(cc.get("stale-if-error")) or 0.0)
    lifetime = freshness_lifetime(meta, rules, heuristic_max)
    return age(meta, now) - lifetime <= allowed
