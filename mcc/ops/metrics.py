"""Counters for monitoring: what the HTTP server answered, kept as typed records.

The server records each response here; the engine, the store and the upstream
client keep their own counters. :mod:`mcc.ops.collector` reads all of them at scrape
time and hands them to prometheus_client for the text exposition.

Each counter is an attribute of an attrs record (``m.requests.hit``,
``m.served.cache``), never a string key, so that a misspelt name is a type error
rather than a series that silently stays empty. The one place strings come in is the
server's cache status word, turned into an :class:`Outcome` by a table.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import assert_never

import attrs

from ..origins import OriginPolicy, split_host_port
from .outcome import Outcome, outcome_of

__all__ = [
    "DURATION_BUCKETS",
    "MAX_HOST_LABELS",
    "OTHER",
    "WINDOW_SECONDS",
    "DurationHistogram",
    "Metrics",
    "OpsErrors",
    "Outcome",
    "RequestCounts",
    "ServedBytes",
    "fold_tail",
    "outcome_of",
]

# Request duration histogram bounds in seconds: from a fast hit to a slow cold miss.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The summary's "recent" window, as Connected Cache's summary report uses.
WINDOW_SECONDS = 15
# Per-second history kept for the status page's throughput chart.
HISTORY_SECONDS = 600
# Distinct content hosts that get their own entry (the per-host byte counters, the
# summary's hosts table, their /metrics series). Hosts beyond it, and every host off
# the allowlist, are counted under OTHER: the Host header is the client's to choose,
# and each label set costs memory here and in every Prometheus that scrapes us.
# 256 holds the Connected Cache content endpoints several times over.
MAX_HOST_LABELS = 256
# The label value that stands for "every host (or upstream) past the cap".
OTHER = "other"
# Objects tracked for the status page's "top objects" (halved when exceeded).
_MAX_TRACKED_URLS = 1000
# Longest URL kept as a "top objects" key; longer ones are cut (a request head may be
# up to max_request_head long, and 1,000 such keys would cost megabytes).
_MAX_URL_KEY = 1024
# Host headers whose label was worked out, remembered to spare the parsing (cleared
# when full, so it stays bounded whatever Host values arrive).
_MAX_LABEL_CACHE = 4096


@attrs.define
class RequestCounts:
    """Responses by :class:`Outcome` (``pass_``: ``pass`` is a keyword)."""

    hit: int = 0
    miss: int = 0
    partial: int = 0
    revalidated: int = 0
    stale: int = 0
    pass_: int = 0
    error: int = 0
    aborted: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count one response."""
        match outcome:
            case Outcome.HIT:
                self.hit += 1
            case Outcome.MISS:
                self.miss += 1
            case Outcome.PARTIAL:
                self.partial += 1
            case Outcome.REVALIDATED:
                self.revalidated += 1
            case Outcome.STALE:
                self.stale += 1
            case Outcome.PASS:
                self.pass_ += 1
            case Outcome.ERROR:
                self.error += 1
            case Outcome.ABORTED:
                self.aborted += 1
            case _:
                assert_never(outcome)

    @property
    def not_hit(self) -> int:
        """Responses that went upstream: misses, partial hits, revalidations and
        passes (the summary's ``missRequests``)."""
        return self.miss + self.partial + self.revalidated + self.pass_

    def by_outcome(self) -> list[tuple[Outcome, int]]:
        """Every outcome with its count, in :class:`Outcome` order."""
        return [
            (Outcome.HIT, self.hit),
            (Outcome.MISS, self.miss),
            (Outcome.PARTIAL, self.partial),
            (Outcome.REVALIDATED, self.revalidated),
            (Outcome.STALE, self.stale),
            (Outcome.PASS, self.pass_),
            (Outcome.ERROR, self.error),
            (Outcome.ABORTED, self.aborted),
        ]


@attrs.define
class ServedBytes:
    """Body bytes sent to clients, by where they came from."""

    cache: int = 0  # hits, revalidated and stale responses (bodies from the store)
    upstream: int = 0  # everything else (misses, partial hits, passes, errors)

    @property
    def total(self) -> int:
        """Every body byte sent to clients."""
        return self.cache + self.upstream


@attrs.define
class OpsErrors:
    """Unexpected exceptions the admin listener contained, by where they happened
    (the engine and the HTTP server count theirs in ``Cache.internal_errors``)."""

    admin: int = 0  # a handler or the admin connection
    warm: int = 0  # a warm job


@attrs.define
class DurationHistogram:
    """Time to answer a request, in :data:`DURATION_BUCKETS` (plus one for +Inf)."""

    buckets: list[int] = attrs.field(factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Count one request that took ``seconds``."""
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le`` label, requests at most that long) for each bound, +Inf last."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*DURATION_BUCKETS, None), self.buckets, strict=True):
            total += n
            out.append(("+Inf" if bound is None else repr(bound), total))
        return out


# Outcomes the summary counts as misses (they cost an upstream request).
_WENT_UPSTREAM = frozenset((Outcome.MISS, Outcome.PARTIAL, Outcome.REVALIDATED, Outcome.PASS))
# Outcomes whose body came from the store.
_FROM_STORE = frozenset((Outcome.HIT, Outcome.REVALIDATED, Outcome.STALE))


class _Second:
    __slots__ = ("hit_bytes", "hit_requests", "miss_bytes", "miss_requests", "t")

    def __init__(self, t: int) -> None:
        self.t = t
        self.hit_bytes = self.miss_bytes = self.hit_requests = self.miss_requests = 0


class Metrics:
    """What the HTTP server has answered, by cache status, byte volume and time.

    Every table keyed by something a client chooses is bounded: at most
    :data:`MAX_HOST_LABELS` hosts plus :data:`OTHER`, and a bounded top-objects table.

    Args:
      policy: the allowlist; hosts it does not allow are counted under :data:`OTHER`.
        Without one, every host is eligible (still capped).
    """

    def __init__(self, policy: OriginPolicy | None = None) -> None:
        self.started = time.time()
        self._policy = policy
        self.requests = RequestCounts()
        self.served = ServedBytes()
        self.durations = DurationHistogram()
        self.internal_errors = OpsErrors()
        # keyed by label values (hosts, URLs): bounded, see _host_label and _count_url
        self.bytes_by_host: dict[str, int] = defaultdict(int)
        self.bytes_by_url: dict[str, int] = defaultdict(int)
        self._labels: dict[str, str | None] = {}
        self._history: deque[_Second] = deque(maxlen=HISTORY_SECONDS)

    def record(
        self, cache_status: str, nbytes: int, duration: float, host: str | None, url: str
    ) -> None:
        """Count one response.

        Args:
          cache_status: the server's word for it (``AccessRecord.cache``), see
            :func:`outcome_of`.
          nbytes: body bytes sent.
          duration: seconds from the request head to the last byte.
          host: the content host (``host[:port]``) the request named, if any.
          url: the object's URL (for the top objects table).
        """
        outcome = outcome_of(cache_status)
        self.requests.add(outcome)
        if outcome in _FROM_STORE:
            self.served.cache += nbytes
        else:
            self.served.upstream += nbytes
        if host:
            label = self._host_label(host)
            self.bytes_by_host[label or OTHER] += nbytes
            if label is not None:  # an allowed host: the object may be a top one
                self._count_url(url, nbytes)
        self.durations.observe(duration)
        sec = self._second(int(time.time()))
        if outcome is Outcome.HIT:
            sec.hit_bytes += nbytes
            sec.hit_requests += 1
        elif outcome in _WENT_UPSTREAM:
            sec.miss_bytes += nbytes
            sec.miss_requests += 1

    def _host_label(self, authority: str) -> str | None:
        """The label ``authority`` (a URL's ``host[:port]``) is counted under: the
        normalised ``host[:port]`` (port left out when 80), :data:`OTHER` once
        :data:`MAX_HOST_LABELS` hosts have their own entry, or None for a host the
        allowlist does not allow (or that does not parse). A host keeps its entry
        for good, so the series Prometheus sees stay stable."""
        if authority in self._labels:
            return self._labels[authority]
        label: str | None = None
        try:
            host, port = split_host_port(authority, 80)
        except ValueError:
            pass
        else:
            if self._policy is None or self._policy.allows(host, port):
                label = f"[{host}]" if ":" in host else host
                if port != 80:
                    label += f":{port}"
                own = len(self.bytes_by_host) - (OTHER in self.bytes_by_host)
                if label not in self.bytes_by_host and own >= MAX_HOST_LABELS:
                    label = OTHER
        if len(self._labels) >= _MAX_LABEL_CACHE:
            self._labels.clear()
        self._labels[authority] = label
        return label

    def _count_url(self, url: str, nbytes: int) -> None:
        if len(url) > _MAX_URL_KEY:
            url = url[:_MAX_URL_KEY] + "..."
        self.bytes_by_url[url] += nbytes
        if len(self.bytes_by_url) > _MAX_TRACKED_URLS:
            keep = sorted(self.bytes_by_url.items(), key=lambda kv: -kv[1])
            self.bytes_by_url = defaultdict(int, keep[: _MAX_TRACKED_URLS // 2])

    def _second(self, t: int) -> _Second:
        if not self._history or self._history[-1].t != t:
            self._history.append(_Second(t))
        return self._history[-1]

    def window(self, seconds: int, now: float | None = None) -> dict[str, int]:
        """Hit/miss bytes and requests over the last ``seconds``."""
        edge = int(time.time() if now is None else now) - seconds
        out = {"hitBytes": 0, "missBytes": 0, "hitRequests": 0, "missRequests": 0}
        for s in self._history:
            if s.t > edge:
                out["hitBytes"] += s.hit_bytes
                out["missBytes"] += s.miss_bytes
                out["hitRequests"] += s.hit_requests
                out["missRequests"] += s.miss_requests
        return out

    def history(self, seconds: int) -> list[tuple[int, int, int]]:
        """(unix second, hit bytes, miss bytes) for each of the last ``seconds``."""
        now = int(time.time())
        by_t = {s.t: s for s in self._history}
        return [
            (t, by_t[t].hit_bytes if t in by_t else 0, by_t[t].miss_bytes if t in by_t else 0)
            for t in range(now - seconds + 1, now + 1)
        ]


def fold_tail(
    samples: Iterable[tuple[dict[str, str], float]], label: str, cap: int = MAX_HOST_LABELS
) -> list[tuple[dict[str, str], float]]:
    """Bound a family's cardinality at render time: keep the ``cap`` values of ``label``
    with the largest totals and sum every other value's samples under :data:`OTHER`
    (the remaining labels kept apart).

    Args:
      samples: (labels, value) pairs, each with ``label`` among its labels.
      label: the label whose distinct values are capped.
      cap: how many distinct values keep their own series.

    Returns:
      the samples, at most ``cap`` + 1 values of ``label``, in the order given.
    """
    rows = list(samples)
    totals: dict[str, float] = defaultdict(float)
    for labels, value in rows:
        totals[labels[label]] += value
    if len(totals) <= cap:
        return rows
    kept = set(sorted(totals, key=lambda k: -totals[k])[:cap])
    out: list[tuple[dict[str, str], float]] = []
    folded: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for labels, value in rows:
        if labels[label] in kept:
            out.append((labels, value))
        else:
            folded[tuple({**labels, label: OTHER}.items())] += value
    out += [(dict(key), value) for key, value in folded.items()]
    return out
