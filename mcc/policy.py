"""What a shared cache may do with a response (RFC 9111), as pure functions and tables.

Nothing here does I/O; the engine asks, the store keeps, the upstream fetches.

**Storing** (section 3): :func:`refusal` says why a response must not be stored
(status, ``no-store``, unqualified ``private``, ``Vary: *``). A response that
varies on request fields is stored as one of its object's variants, under a secondary
key (:func:`variant_key`) made from the request fields it varies on.
:func:`stored_fields` says which header fields are kept with it (section 3.1): every
end-to-end field (:func:`end_to_end` drops the hop-by-hop ones of RFC 9110 section
7.6.1 and those Connection names), except the ones the cache writes
itself per response (:data:`SELF_WRITTEN`) and those named by ``no-cache="..."`` or
``private="..."``. The record keeps the *corrected initial age* (section 4.2.3) under
``age``; it is an input of the Age sent on hits, never replayed as is. A 304 (or a
same-version 200/206) updates the stored fields (sections 3.2 and 4.3.4,
:func:`refreshed`). :func:`version_change` says when an answer to a block fetch shows
the object changed upstream.

**Freshness** (section 4.2): how long a stored response may be used unchecked.
Lifetime, in order of precedence:
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
import urllib.parse
from collections.abc import Sequence

import attrs

from . import refresh_defaults
from .headers import HOP_BY_HOP, is_digits, parse_cache_control
from .store.records import ObjectMeta, make_version

__all__ = [
    "DEFAULT_REFRESH_RULES",
    "HOP_BY_HOP",
    "SELF_WRITTEN",
    "RefreshRule",
    "age",
    "corrected_initial_age",
    "end_to_end",
    "freshness_lifetime",
    "invalidated",
    "is_fresh",
    "matching_rule",
    "may_serve_stale",
    "object_key",
    "record",
    "refreshed",
    "refusal",
    "replayed_fields",
    "selecting_fields",
    "stored_fields",
    "variant_key",
    "variant_names",
    "vary_names",
    "version_change",
]

Headers = Sequence[tuple[str, str]]

# Fields the cache writes itself for each response it sends: the length and range of
# what it sends, Age (RFC 9111 s5.1), computed from the record (:func:`age`), and
# Cache-Status (RFC 9211), which tells how the caches on the way handled one response.
SELF_WRITTEN = frozenset(
    {"content-length", "content-range", "age", "cache-status", "accept-ranges"}
)
# Fields the record keeps in attributes of their own (ObjectMeta.etag, ...), not among
# its header fields; an update never changes them (a 304 confirms the version).
_OWN_ATTRIBUTES = frozenset({"etag", "last-modified", "content-type"})
# The record's own field holding the corrected initial age (RFC 9111 s4.2.3).
_AGE = "age"
# Statuses a cache stores here (RFC 9111 s3: only complete 200s and 206s of a range).
STORABLE_STATUSES = frozenset({200, 206})
# Vary on these request fields leaves every variant the same bytes for mcc, which
# never asks upstream for an encoding.
HARMLESS_VARY = frozenset({"accept-encoding"})
# Statuses that answer a block fetch for a version that is no longer there.
GONE_STATUSES = frozenset({404, 410, 412, 416})


def _first(headers: Headers, name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _joined(headers: Headers, name: str) -> str | None:
    """Every value of field ``name`` as one comma list (RFC 9110 s5.3), or None."""
    values = [v for k, v in headers if k == name]
    return ", ".join(values) if values else None


def _field_names(arg: str | None) -> set[str]:
    """The field names of a qualified ``no-cache="a, b"`` / ``private="a"`` (lower case)."""
    return {n.strip().lower() for n in (arg or "").split(",") if n.strip()}


def end_to_end(headers: Headers) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop fields (RFC 9110 s7.6.1): those of
    :data:`HOP_BY_HOP` and every field the Connection field names."""
    named = _field_names(_joined(headers, "connection"))
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


def corrected_initial_age(headers: Headers, now: float) -> int:
    """RFC 9111 s4.2.3: how old a response received ``now`` already is: the larger of
    its Age and the time since its Date (the request's delay is not known here and
    counted as zero)."""
    age_value = _seconds(_first(headers, _AGE)) or 0.0
    date = _date(_first(headers, "date"))
    apparent = max(0.0, now - date) if date is not None else 0.0
    return int(max(age_value, apparent))


def stored_fields(headers: Headers, now: float) -> tuple[tuple[str, str], ...]:
    """The header fields kept with a response received ``now`` (RFC 9111 s3.1): every
    end-to-end field but :data:`SELF_WRITTEN` and those a qualified ``no-cache`` or
    ``private`` names (RFC 9111 s5.2.2.4, s5.2.2.7), then the record's own ``age``."""
    cc = parse_cache_control(_joined(headers, "cache-control"))
    withheld = _field_names(cc.get("no-cache")) | _field_names(cc.get("private"))
    kept = tuple(
        (k, v) for k, v in end_to_end(headers) if k not in SELF_WRITTEN and k not in withheld
    )
    return (*kept, (_AGE, str(corrected_initial_age(headers, now))))


def replayed_fields(meta: ObjectMeta) -> list[tuple[str, str]]:
    """The stored fields sent with a response built from the record (the Age and the
    framing fields are the sender's to add)."""
    return [(k, v) for k, v in meta.headers if k not in SELF_WRITTEN]


def refusal(status: int, headers: Headers) -> str | None:
    """Why a response to a discovery must not be stored, or None when it may be."""
    if status not in STORABLE_STATUSES:
        return f"upstream answered {status}"
    cc = parse_cache_control(_joined(headers, "cache-control"))
    # a qualified private="field" only keeps that field out (see stored_fields)
    if "no-store" in cc or ("private" in cc and cc["private"] is None):
        return "upstream said no-store or private"
    if vary_names(headers) is None:
        return "upstream varies on *"  # RFC 9111 s4.1: never matches a later request
    return None


# The mark between an object's key and the request fields that select one of its
# variants (RFC 9111 s4.1): ``http://h/x#vary;accept-language=de``. A fragment never
# reaches upstream, so no URL asked for can name a variant key.
_VARIANT_MARK = "#vary;"


def vary_names(headers: Headers) -> tuple[str, ...] | None:
    """The request fields a response varies on (sorted, lower case, those in
    :data:`HARMLESS_VARY` left out), or None for ``Vary: *``."""
    names = _field_names(_joined(headers, "vary"))
    if "*" in names:
        return None
    return tuple(sorted(names - HARMLESS_VARY))


def variant_key(key: str, names: Sequence[str], request: Headers) -> str:
    """The secondary key of the variant of ``key`` that a request with fields
    ``request`` selects, when the response varies on ``names`` (RFC 9111 s4.1: values
    compared after joining repeated fields; an absent field is its own value)."""
    parts = []
    for name in names:
        value = _joined(request, name)
        shown = "" if value is None else "=" + urllib.parse.quote(" ".join(value.split()), safe="")
        parts.append(name + shown)
    return key.split(_VARIANT_MARK, 1)[0] + _VARIANT_MARK + ";".join(parts)


def selecting_fields(key: str) -> list[tuple[str, str]]:
    """The request fields a variant key was made from (sent upstream with every
    request for that variant's bytes); none for a plain key."""
    _, mark, rest = key.partition(_VARIANT_MARK)
    if not mark:
        return []
    out = []
    for part in rest.split(";"):
        name, sep, value = part.partition("=")
        if name and sep:
            out.append((name, urllib.parse.unquote(value)))
    return out


def object_key(key: str) -> str:
    """The key of the object a (variant) key belongs to."""
    return key.split(_VARIANT_MARK, 1)[0]


def variant_names(key: str) -> tuple[str, ...]:
    """The field names a variant key selects on (empty for a plain key)."""
    _, mark, rest = key.partition(_VARIANT_MARK)
    return tuple(p.partition("=")[0] for p in rest.split(";") if p) if mark else ()


def record(
    key: str, size: int, headers: Headers, *, now: float, fetch_url: str, block_size: int
) -> ObjectMeta:
    """The record of a storable response (see :func:`refusal`) for object ``key``."""
    etag, lm = _first(headers, "etag"), _first(headers, "last-modified")
    return ObjectMeta(
        key=key,
        version=make_version(etag, lm, size),
        size=size,
        etag=etag,
        last_modified=lm,
        content_type=_first(headers, "content-type"),
        headers=tuple((k, v) for k, v in stored_fields(headers, now) if k not in _OWN_ATTRIBUTES),
        fetched_at=now,
        fetch_url=fetch_url,
        block_size=block_size,
    )


def refreshed(stale: ObjectMeta, headers: Headers, now: float) -> ObjectMeta:
    """``stale`` updated by a 304, or by a 200/206 of the same version (RFC 9111 s3.2,
    s4.3.4): confirmed now, each field the answer would store replacing every stored
    field of that name, the others kept. The validators that name the version stay."""
    fresh = [(k, v) for k, v in stored_fields(headers, now) if k not in _OWN_ATTRIBUTES]
    updated = {k for k, _ in fresh}
    kept = tuple((k, v) for k, v in stale.headers if k not in updated)
    return attrs.evolve(stale, headers=(*kept, *fresh), fetched_at=now)


# RFC 9110 s9.2.1: methods that do not change the resource; the others invalidate.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Fields of an unsafe method's answer naming other URLs it changed (RFC 9111 s4.4).
_INVALIDATING_FIELDS = ("location", "content-location")


def invalidated(method: str, url: str, status: int, headers: Headers) -> list[str]:
    """The URLs a response to ``method url`` makes stale (RFC 9111 s4.4): for an
    unsafe method answered with a non-error status, the target and the URLs in
    Location and Content-Location that have the target's origin (scheme, host, port),
    relative references resolved against the target. A value that does not parse is
    skipped."""
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    out = [url]
    origin = _origin_of(url)
    for name in _INVALIDATING_FIELDS:
        for value in (v for k, v in headers if k == name):
            try:
                target = urllib.parse.urljoin(url, value.strip()).split("#", 1)[0]
            except ValueError:
                continue
            if origin is not None and _origin_of(target) == origin and target not in out:
                out.append(target)
    return out


def _origin_of(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None
    if port is None or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port


def version_change(meta: ObjectMeta, status: int, headers: Headers) -> str | None:
    """Why an answer to a block fetch of ``meta`` shows another version, or None.

    A changed validator, a 200 of another length, or a status saying the version is
    gone (404, 410, 412, 416) all mean the stored blocks must not be mixed with new ones.
    """
    etag, lm = _first(headers, "etag"), _first(headers, "last-modified")
    if meta.etag and etag and etag != meta.etag:
        return f"validator changed from {meta.etag}"
    if not meta.etag and meta.last_modified and lm and lm != meta.last_modified:
        return f"validator changed from {meta.last_modified}"
    if status == 200:
        length = _first(headers, "content-length")
        if length is not None and is_digits(length) and int(length) != meta.size:
            return f"length changed from {meta.size} to {length}"
    if status in GONE_STATUSES:
        return f"upstream now answers {status}"
    return None


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
        url = url.split(_VARIANT_MARK, 1)[0]  # a variant follows its object's rule
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
    return _joined(meta.headers, name) if name == "cache-control" else _first(meta.headers, name)


def _date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(value: str | None) -> float | None:
    if value is None or not is_digits(value.strip()):
        return None
    return float(value.strip())


def freshness_lifetime(
    meta: ObjectMeta, rules: Sequence[RefreshRule] = (), heuristic_max: float = 86400.0
) -> float:
    """Seconds the stored response stays fresh after it was fetched."""
    cc = parse_cache_control(_header(meta, "cache-control"))
    lifetime: float | None = None
    if "no-cache" in cc and cc["no-cache"] is None:  # no-cache="f" only withholds f
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
    """The response's current age (RFC 9111 s4.2.3): its corrected initial age when
    received, plus the time it has been stored since."""
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
