"""The node's counters as Prometheus metric families, for ``GET /metrics``.

:class:`NodeCollector` is a prometheus_client collector: it keeps no state of its own
and reads, at each scrape, the counters the HTTP server (:class:`~mcc.ops.metrics.Metrics`),
the engine (``Cache.statistics()``, ``Cache.internal_errors``), the store and the
upstream client keep anyway. Each :class:`~mcc.ops.admin.AdminServer` registers one in a
registry of its own (never prometheus_client's global one, so that two nodes in one
process, as in the tests, do not mix), and prometheus_client writes the text format.

Every label set stays bounded whatever clients send: hosts are capped when counted
(:data:`~mcc.ops.metrics.MAX_HOST_LABELS`), upstream names when collected
(:func:`~mcc.ops.metrics.fold_tail`); drives and parents come from the config, and the
``where`` of internal errors from a fixed list of boundaries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import attrs
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ..engine.engine import Cache
from .looplag import RECENT_SECONDS
from .metrics import MAX_HOST_LABELS, OTHER, Metrics, fold_tail

__all__ = ["CONTENT_TYPE", "NodeCollector", "node_registry", "render"]

# What generate_latest writes: the Prometheus text format 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The boundaries that contain unexpected exceptions; each is listed even at zero, so a
# rate() over it works from the first scrape.
_ERROR_BOUNDARIES = ("admin", "engine", "http", "warm")


class NodeCollector(Collector):
    """Collects one node's counters at scrape time.

    Args:
      cache: the engine (its statistics, store and upstream client).
      metrics: the HTTP server's response counters.
      open_connections: a function returning the number of client connections.
    """

    def __init__(self, cache: Cache, metrics: Metrics, open_connections: Callable[[], int]) -> None:
        self._cache = cache
        self._metrics = metrics
        self._open_connections = open_connections

    def collect(self) -> Iterable[Metric]:
        """Every family, in the order the README lists them."""
        m = self._metrics
        cache = self._cache
        stats = cache.statistics()
        up = cache.upstream
        drives = cache.store.drives

        requests = CounterMetricFamily(
            "mcc_requests_total", "Responses by cache outcome.", labels=["cache"]
        )
        for outcome, n in m.requests.by_outcome():
            requests.add_metric([outcome.value], n)
        yield requests

        served = CounterMetricFamily(
            "mcc_served_bytes_total", "Body bytes sent to clients by source.", labels=["source"]
        )
        served.add_metric(["cache"], m.served.cache)
        served.add_metric(["upstream"], m.served.upstream)
        yield served

        hosts = CounterMetricFamily(
            "mcc_host_bytes_total",
            f"Body bytes sent to clients per content host ({OTHER}: hosts off the "
            f"allowlist or past the first {MAX_HOST_LABELS}).",
            labels=["host"],
        )
        for host, n in sorted(m.bytes_by_host.items()):
            hosts.add_metric([host], n)
        yield hosts

        upstream = CounterMetricFamily(
            "mcc_upstream_requests_total",
            "Upstream requests by upstream and outcome.",
            labels=["upstream", "outcome"],
        )
        # one series per upstream name: an allowlist *.suffix admits any number of them
        rows = [({"upstream": u, "outcome": o}, float(n)) for (u, o), n in up.outcomes.items()]
        for labels, value in sorted(
            fold_tail(rows, "upstream"), key=lambda r: (r[0]["upstream"], r[0]["outcome"])
        ):
            upstream.add_metric([labels["upstream"], labels["outcome"]], value)
        yield upstream

        yield CounterMetricFamily(
            "mcc_upstream_bytes_total", "Body bytes received from upstream.", up.bytes_received
        )
        yield CounterMetricFamily(
            "mcc_flight_joins_total",
            "Requests that joined a fetch already in flight.",
            stats.flight_joins,
        )

        stored = GaugeMetricFamily(
            "mcc_store_bytes", "Bytes stored per cache drive.", labels=["drive"]
        )
        capacity = GaugeMetricFamily(
            "mcc_store_capacity_bytes", "max_size per cache drive.", labels=["drive"]
        )
        for i, d in enumerate(drives):
            stored.add_metric([str(d.root)], cache.store.stored_bytes_on(i))
            capacity.add_metric([str(d.root)], d.max_size)
        yield stored
        yield capacity

        yield CounterMetricFamily(
            "mcc_evictions_total",
            "Blocks evicted to keep drives under max_size.",
            stats.evictions,
        )
        yield CounterMetricFamily(
            "mcc_corrupt_blocks_total", "Blobs that failed verification.", stats.corrupt_blocks
        )
        yield CounterMetricFamily(
            "mcc_store_failures_total",
            "Blocks that could not be written (ENOSPC...).",
            stats.store_failures,
        )
        recovered = GaugeMetricFamily(
            "mcc_store_recovered",
            "What the start-up recovery repaired: temp files and orphan blobs removed, "
            "index rows dropped for a missing or short blob.",
            labels=["kind"],
        )
        for kind, n in attrs.asdict(cache.store.recovery).items():
            recovered.add_metric([kind], n)
        yield recovered
        yield GaugeMetricFamily(
            "mcc_open_connections", "Client connections open now.", self._open_connections()
        )

        errors = CounterMetricFamily(
            "mcc_internal_errors_total",
            "Unexpected exceptions contained (answered 500, logged with a traceback).",
            labels=["where"],
        )
        for where, n in self._internal_errors():
            errors.add_metric([where], n)
        yield errors

        parents = GaugeMetricFamily(
            "mcc_parent_up", "1 when a parent cache is considered up.", labels=["parent"]
        )
        for parent, ok in up.parent_health().items():
            parents.add_metric([parent], 1 if ok else 0)
        yield parents

        yield HistogramMetricFamily(
            "mcc_request_duration_seconds",
            "Time to answer a request.",
            buckets=m.durations.cumulative(),
            sum_value=m.durations.sum,
        )

        lag = m.loop_lag
        yield HistogramMetricFamily(
            "mcc_loop_lag_seconds",
            "How late the event loop woke the lag probe (a stall every request waits out).",
            buckets=lag.cumulative(),
            sum_value=lag.sum,
        )
        recent = lag.recent(time.monotonic())
        window = GaugeMetricFamily(
            "mcc_loop_lag_recent_seconds",
            f"Loop lag over the last {RECENT_SECONDS:.0f} s: 99th percentile and maximum.",
            labels=["quantile"],
        )
        window.add_metric(["0.99"], recent.p99)
        window.add_metric(["1"], recent.max)
        yield window

    def _internal_errors(self) -> list[tuple[str, int]]:
        """Contained errors per boundary: engine and http from the cache, admin and warm
        from the admin's counters; every boundary listed, sorted by name."""
        total = dict.fromkeys(_ERROR_BOUNDARIES, 0)
        for where, n in self._cache.internal_errors.items():
            total[where] = total.get(where, 0) + n
        ops = self._metrics.internal_errors
        total["admin"] += ops.admin
        total["warm"] += ops.warm
        return sorted(total.items())


def node_registry(
    cache: Cache, metrics: Metrics, open_connections: Callable[[], int]
) -> CollectorRegistry:
    """A registry of its own holding one :class:`NodeCollector` (and nothing else)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(cache, metrics, open_connections))
    return registry


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition (:data:`CONTENT_TYPE`) of ``registry``."""
    return generate_latest(registry).decode()
