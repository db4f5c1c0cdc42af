"""Node totals of a node run as several worker processes (``--workers N``).

Theory of operation: the master makes :class:`~mcc.ops.slots.CounterSlots` holding
:func:`summed_keys` (one per Prometheus sample whose labels come from the code, not
from clients: responses by outcome, bytes served by source, upstream bytes, joined
fetches, evictions, corrupt blocks, store failures, open connections, contained
errors by boundary and the request-duration histogram) before it forks. Each
worker's :class:`Publisher` writes its own values into its slot every
:data:`PUBLISH_SECONDS` (and once more as it stops), collected by the same
:class:`~mcc.ops.collector.NodeCollector` that serves ``/metrics``; a restarted
worker goes on from what its slot held, so totals never go backwards (what a killed
worker counted in its last period is lost). The admin API, served by worker 0
alone (:class:`NodeAdmin`), answers ``/metrics`` and ``/summary`` with every
summed sample replaced by the node's total. What depends on client-chosen labels
(bytes per host and per object, upstreams by name), the last-15-s window and the
loop lag stay worker 0's own; store bytes come from the shared index already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..engine.engine import Cache
from . import reports
from .admin import AdminServer
from .collector import NodeCollector, render
from .metrics import DurationHistogram, Metrics
from .outcome import Outcome
from .slots import CounterSlots, Slot

__all__ = ["PUBLISH_SECONDS", "NodeAdmin", "Publisher", "summed_keys"]

# How often a worker writes its counters into its slot (the node totals lag by this)
PUBLISH_SECONDS = 0.1
# Float samples (seconds) kept in the integer slots in microseconds
_MICRO = 1_000_000
_GAUGES = frozenset({"mcc_open_connections"})
_SINGLE = (
    "mcc_upstream_bytes_total",
    "mcc_flight_joins_total",
    "mcc_evictions_total",
    "mcc_corrupt_blocks_total",
    "mcc_store_failures_total",
    "mcc_open_connections",
    "mcc_request_duration_seconds_count",
    "mcc_request_duration_seconds_sum",
)
_BOUNDARIES = ("admin", "engine", "http", "warm")


def _key(name: str, labels: dict[str, str]) -> str:
    return name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))


def summed_keys() -> list[str]:
    """Every sample summed over the workers, as slot names."""
    keys = [_key("mcc_requests_total", {"cache": o.value}) for o in Outcome]
    keys += [_key("mcc_served_bytes_total", {"source": s}) for s in ("cache", "upstream")]
    keys += [_key("mcc_internal_errors_total", {"where": w}) for w in _BOUNDARIES]
    keys += [
        _key("mcc_request_duration_seconds_bucket", {"le": le})
        for le, _ in DurationHistogram().cumulative()
    ]
    return keys + [_key(name, {}) for name in _SINGLE]


def _samples(collector: Collector, wanted: frozenset[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in collector.collect():
        for s in family.samples:
            k = _key(s.name, s.labels)
            if k in wanted:
                out[k] = round(s.value * _MICRO) if s.name.endswith("_sum") else int(s.value)
    return out


class Publisher:
    """Writes one worker's counters into its slot (see the module).

    Args:
      slot: this worker's slot.
      collector: the worker's own collector.
    """

    def __init__(self, slot: Slot, collector: Collector) -> None:
        self._slot = slot
        self._collector = collector
        self._keys = frozenset(summed_keys())
        # a restarted worker goes on from its slot (gauges start again from now)
        self._base = {k: 0 if k.split("|")[0] in _GAUGES else slot.get(k) for k in self._keys}

    def publish(self) -> None:
        """Write the counters now."""
        values = _samples(self._collector, self._keys)
        for k in self._keys:
            want = self._base[k] + values.get(k, 0)
            self._slot.add(k, want - self._slot.get(k))

    async def run(self) -> None:
        """Publish every :data:`PUBLISH_SECONDS` until cancelled, and once at the end."""
        try:
            while True:
                self.publish()
                await trio.sleep(PUBLISH_SECONDS)
        finally:
            self.publish()


class _Totals(Collector):
    """A collector yielding ``inner``'s families with the summed samples replaced by
    the node's totals."""

    def __init__(self, inner: Collector, slots: CounterSlots) -> None:
        self._inner = inner
        self._slots = slots

    def collect(self) -> Iterable[Metric]:
        totals = self._slots.totals()
        for family in self._inner.collect():
            for i, s in enumerate(family.samples):
                k = _key(s.name, s.labels)
                if k in totals:
                    value = totals[k] / _MICRO if s.name.endswith("_sum") else totals[k]
                    family.samples[i] = s._replace(value=value)
            yield family


class NodeAdmin(AdminServer):
    """The admin API of a node of several workers: node totals in ``/metrics`` and
    ``/summary`` (see the module).

    Args:
      cache, metrics, open_connections: as :class:`AdminServer` (this worker's).
      slots: every worker's counters.
    """

    def __init__(
        self,
        cache: Cache,
        metrics: Metrics,
        open_connections: Callable[[], int],
        slots: CounterSlots,
    ) -> None:
        super().__init__(cache, metrics, open_connections)
        self.slots = slots
        self.node_registry = CollectorRegistry()
        inner = NodeCollector(cache, metrics, open_connections)
        self.node_registry.register(_Totals(inner, slots))

    def render_metrics(self) -> str:
        """The Prometheus exposition, summed samples as node totals."""
        return render(self.node_registry)

    def summary(self) -> dict[str, Any]:
        """The summary, with node totals since start (see the module)."""
        doc = super().summary()
        t = self.slots.totals()

        def requests(*outcomes: Outcome) -> int:
            return sum(t[_key("mcc_requests_total", {"cache": o.value})] for o in outcomes)

        cache_bytes = t[_key("mcc_served_bytes_total", {"source": "cache"})]
        upstream_bytes = t[_key("mcc_served_bytes_total", {"source": "upstream"})]
        went_upstream = (Outcome.MISS, Outcome.PARTIAL, Outcome.REVALIDATED, Outcome.PASS)
        doc["sinceStart"] = reports.ratios(
            cache_bytes, upstream_bytes, requests(Outcome.HIT), requests(*went_upstream)
        )
        doc["egressBytes"] = cache_bytes + upstream_bytes
        doc["upstreamBytes"] = t[_key("mcc_upstream_bytes_total", {})]
        doc["flightJoins"] = t[_key("mcc_flight_joins_total", {})]
        doc["openConnections"] = t[_key("mcc_open_connections", {})]
        names = [_key("mcc_requests_total", {"cache": o.value}) for o in Outcome]
        slots = [self.slots.slot(i) for i in range(self.slots.workers)]
        doc["workerRequests"] = [sum(slot.get(k) for k in names) for slot in slots]
        return doc
