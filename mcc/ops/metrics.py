"""Counters for monitoring, and their Prometheus text exposition (format 0.0.4).

The server records each response here; the engine, the store and the upstream
client keep their own counters, which :func:`render` reads at scrape time.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict, deque
from collections.abc import Iterable

from ..origins import OriginPolicy, split_host_port

__all__ = [
    "DURATION_BUCKETS",
    "MAX_HOST_LABELS",
    "OTHER",
    "WINDOW_SECONDS",
    "Metrics",
    "exposition",
    "fold_tail",
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
        self.requests: dict[str, int] = defaultdict(int)
        self.bytes_by_source: dict[str, int] = defaultdict(int)
        self.bytes_by_host: dict[str, int] = defaultdict(int)
        self.bytes_by_url: dict[str, int] = defaultdict(int)
        # unexpected exceptions contained, by where they happened ("admin", "warm"...)
        self.internal_errors: dict[str, int] = defaultdict(int)
        self._labels: dict[str, str | None] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.duration_count = 0
        self._history: deque[_Second] = deque(maxlen=HISTORY_SECONDS)

    def record(
        self, cache_status: str, nbytes: int, duration: float, host: str | None, url: str
    ) -> None:
        """Count one response."""
        kind = _kind(cache_status)
        self.requests[kind] += 1
        source = "cache" if kind == "hit" else "upstream"
        self.bytes_by_source[source] += nbytes
        if host:
            label = self._host_label(host)
            self.bytes_by_host[label or OTHER] += nbytes
            if label is not None:  # an allowed host: the object may be a top one
                self._count_url(url, nbytes)
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration
        self.duration_count += 1
        sec = self._second(int(time.time()))
        if kind == "hit":
            sec.hit_bytes += nbytes
            sec.hit_requests += 1
        elif kind in ("miss", "partial", "pass"):
            sec.miss_bytes += nbytes
            sec.miss_requests += 1

    def count_internal_error(self, where: str) -> None:
        """Count one unexpected exception that was contained (``where``: a fixed name)."""
        self.internal_errors[where] += 1

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


def _kind(cache_status: str) -> str:
    if cache_status in ("hit", "miss", "partial", "pass"):
        return cache_status
    return "error"


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


def exposition(families: Iterable[tuple[str, str, str, list[tuple[dict[str, str], float]]]]) -> str:
    """Prometheus text format from (name, type, help, [(labels, value)]) families."""
    lines: list[str] = []
    for name, kind, text, samples in families:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))
