"""The read-only reports of the admin API: ``GET /summary`` and ``GET /health``.

The summary follows Connected Cache's summary report: hit and miss volume for the last
15 s and since start, per content host and per object, with the drives, parents and
peers. ``?cluster=1`` adds every peer's summary up (see :mod:`mcc.ops.cluster`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..engine.engine import Cache
from ..store.check import health as store_health
from .metrics import WINDOW_SECONDS, Metrics

__all__ = ["health", "ratios", "summary"]

# Rows of the summary's tables: content hosts, top objects.
_SUMMARY_HOSTS = 50
_SUMMARY_OBJECTS = 20
# Seconds of per-second throughput in the summary (the status page's chart).
_SUMMARY_THROUGHPUT = 300


def summary(cache: Cache, metrics: Metrics, open_connections: Callable[[], int]) -> dict[str, Any]:
    """Hit/miss volume for the last 15 s and since start, and per-host volume.

    Args:
      cache: the engine.
      metrics: the HTTP server's response counters.
      open_connections: a function returning the number of client connections.

    Returns:
      the ``GET /summary`` document.
    """
    m = metrics
    recent = m.window(WINDOW_SECONDS)
    stats = cache.statistics()
    upstream = cache.upstream
    return {
        "nodeId": cache.config.node_id,
        "uptimeSeconds": round(time.time() - m.started, 1),
        "last15s": ratios(
            recent["hitBytes"],
            recent["missBytes"],
            recent["hitRequests"],
            recent["missRequests"],
        ),
        "sinceStart": ratios(m.served.cache, m.served.upstream, m.requests.hit, m.requests.not_hit),
        "egressBytes": m.served.total,
        "upstreamBytes": upstream.bytes_received,
        "hosts": _top(m.bytes_by_host, _SUMMARY_HOSTS),
        "topObjects": _top(m.bytes_by_url, _SUMMARY_OBJECTS),
        "throughput": m.history(_SUMMARY_THROUGHPUT),
        "drives": [
            {"path": str(d.root), "bytes": cache.store.stored_bytes_on(i), "capacity": d.max_size}
            for i, d in enumerate(cache.store.drives)
        ],
        "parents": upstream.parent_health(),
        "peers": upstream.peers.health(),
        "peerServedBytes": upstream.peers.served_bytes,
        "peerReceivedBytes": upstream.peers.received_bytes,
        "flightJoins": stats.flight_joins,
        "openConnections": open_connections(),
        "loopLag": _loop_lag(m),
    }


def health(cache: Cache) -> dict[str, Any]:
    """Readiness: every drive writable, the index answering; parents listed.

    Returns:
      the ``GET /health`` document; ``ready`` is false when a drive cannot be
      written or the index fails.
    """
    probes, index_ok = store_health(cache.store)
    drives = [{"path": str(path), "writable": ok} for path, ok in probes]
    parents = cache.upstream.parent_health()
    ready = index_ok and all(d["writable"] for d in drives)
    return {"ready": ready, "drives": drives, "index": index_ok, "parents": parents}


def _top(counts: dict[str, int], n: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def ratios(hit_bytes: int, miss_bytes: int, hit_req: int, miss_req: int) -> dict[str, Any]:
    """A summary's hit and miss volume, in bytes and requests, with the hit ratios."""
    total_b, total_r = hit_bytes + miss_bytes, hit_req + miss_req
    return {
        "hitBytes": hit_bytes,
        "missBytes": miss_bytes,
        "hitRequests": hit_req,
        "missRequests": miss_req,
        "hitRatioBytes": round(hit_bytes / total_b, 4) if total_b else None,
        "hitRatioRequests": round(hit_req / total_r, 4) if total_r else None,
    }


def _loop_lag(m: Metrics) -> dict[str, float]:
    """The loop-lag probe's recent p99 and maximum, and its maximum since start, in ms."""
    recent = m.loop_lag.recent(time.monotonic())
    return {
        "recentP99Ms": round(recent.p99 * 1000, 2),
        "recentMaxMs": round(recent.max * 1000, 2),
        "maxMs": round(m.loop_lag.max * 1000, 2),
    }
