"""One outcome per request, and everything that reports it.

Theory of operation: the server settles what a response was once, as a word in
``AccessRecord.cache`` (a :class:`Outcome` value, or ``health`` / ``purge`` for the
node's own answers), plus the status of upstream's answer when it asked upstream
(``AccessRecord.fwd_status``). Three reports derive from that record and nothing
else, so they cannot disagree:

- the ``Cache-Status`` response field (RFC 9211), :func:`cache_status`;
- the access log's ``cache=`` field (the word itself);
- the request counters (``mcc_requests_total{cache=...}``), :func:`outcome_of`.

How a response served from the store gets its outcome is one table,
:data:`SERVED`: the engine's lookup outcome (fresh, miss, changed, revalidated,
stale) and how much of the asked bytes were stored (hit, partial, miss).
"""

from __future__ import annotations

import enum

__all__ = ["SERVED", "Outcome", "cache_status", "outcome_of", "served_outcome"]


class Outcome(enum.Enum):
    """What a response was (the value is the log word and the counter label)."""

    HIT = "hit"  # every byte from the store, no upstream request
    MISS = "miss"  # fetched upstream (and stored)
    PARTIAL = "partial"  # some blocks stored, the rest fetched
    REVALIDATED = "revalidated"  # stored, stale, confirmed by upstream (304 or same version)
    STALE = "stale"  # stored, stale, served because upstream failed (stale-if-error)
    PASS = "pass"  # forwarded unstored (unsafe methods, no-store, Authorization...)
    ERROR = "error"  # answered with an error of the node's own, or anything not listed
    ABORTED = "aborted"  # the client left, or a response broke off, before the end


# (engine lookup outcome, stored coverage of the asked bytes) -> outcome. A record
# learned upstream just now (miss, changed) is never a hit, even when its blocks
# happen to be stored (another version's, or shared content).
SERVED: dict[tuple[str, str], Outcome] = {
    ("fresh", "hit"): Outcome.HIT,
    ("fresh", "partial"): Outcome.PARTIAL,
    ("fresh", "miss"): Outcome.MISS,
    **{(lookup, "hit"): Outcome.MISS for lookup in ("miss", "changed")},
    **{(lookup, "partial"): Outcome.PARTIAL for lookup in ("miss", "changed")},
    **{(lookup, "miss"): Outcome.MISS for lookup in ("miss", "changed")},
    **{("revalidated", c): Outcome.REVALIDATED for c in ("hit", "partial", "miss")},
    **{("stale", c): Outcome.STALE for c in ("hit", "partial", "miss")},
}

_OUTCOME_OF_WORD: dict[str, Outcome] = {o.value: o for o in Outcome}

# Outcome -> the Cache-Status parameters after the node's name (RFC 9211 s2);
# ``{status}`` is upstream's status. None: the field is not sent (an error of the
# node's own is no cache's answer; an aborted response's head went out already).
_CACHE_STATUS: dict[Outcome, str | None] = {
    Outcome.HIT: "hit",
    Outcome.MISS: "fwd=miss; stored",
    Outcome.PARTIAL: "fwd=partial; stored",
    Outcome.REVALIDATED: "fwd=stale; fwd-status={status}",
    Outcome.STALE: "hit; detail=stale-if-error",
    Outcome.PASS: "fwd=uri-miss",
    Outcome.ERROR: None,
    Outcome.ABORTED: None,
}


def served_outcome(lookup: str, coverage: str) -> Outcome:
    """The outcome of a response from the store (see :data:`SERVED`).

    Args:
      lookup: how the engine found the record (``Lookup.outcome``).
      coverage: ``hit``, ``partial`` or ``miss`` (``Cache.coverage``).
    """
    return SERVED.get((lookup, coverage), Outcome.MISS)


def outcome_of(word: str) -> Outcome:
    """The :class:`Outcome` a log word counts as (``health``, ``purge`` and ``""``,
    a request refused before routing, count as ERROR)."""
    return _OUTCOME_OF_WORD.get(word, Outcome.ERROR)


def cache_status(node: str, word: str, fwd_status: int = 0) -> str | None:
    """The Cache-Status field value for a response with outcome ``word``, or None
    when none is sent."""
    params = _CACHE_STATUS[outcome_of(word)]
    if params is None:
        return None
    return f"{node}; {params.format(status=fwd_status or 304)}"
