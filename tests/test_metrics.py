"""The typed response counters (mcc/ops/metrics.py) and their exposition through
prometheus_client (mcc/ops/collector.py)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fixtures.origin import Origin
from mcc.ops.metrics import (
    DURATION_BUCKETS,
    Metrics,
    Outcome,
    RequestCounts,
    outcome_of,
)
from tests.helpers import admin_call, get, run_node

# Every family /metrics has always had: name (as the parser names it) -> type, labels.
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "mcc_requests": ("counter", frozenset({"cache"})),
    "mcc_served_bytes": ("counter", frozenset({"source"})),
    "mcc_host_bytes": ("counter", frozenset({"host"})),
    "mcc_upstream_requests": ("counter", frozenset({"upstream", "outcome"})),
    "mcc_upstream_bytes": ("counter", frozenset()),
    "mcc_flight_joins": ("counter", frozenset()),
    "mcc_store_bytes": ("gauge", frozenset({"drive"})),
    "mcc_store_capacity_bytes": ("gauge", frozenset({"drive"})),
    "mcc_evictions": ("counter", frozenset()),
    "mcc_corrupt_blocks": ("counter", frozenset()),
    "mcc_store_failures": ("counter", frozenset()),
    "mcc_store_recovered": ("gauge", frozenset({"kind"})),
    "mcc_open_connections": ("gauge", frozenset()),
    "mcc_internal_errors": ("counter", frozenset({"where"})),
    "mcc_parent_up": ("gauge", frozenset({"parent"})),
    "mcc_request_duration_seconds": ("histogram", frozenset()),
    "mcc_loop_lag_seconds": ("histogram", frozenset()),
    "mcc_loop_lag_recent_seconds": ("gauge", frozenset({"quantile"})),
}


@pytest.mark.parametrize(
    ("word", "outcome"),
    [
        ("hit", Outcome.HIT),
        ("miss", Outcome.MISS),
        ("partial", Outcome.PARTIAL),
        ("pass", Outcome.PASS),
        ("error", Outcome.ERROR),
        ("aborted", Outcome.ABORTED),
        # the main listener's own answers and requests refused before routing count as
        # errors, as they did when the counters were keyed by strings
        ("health", Outcome.ERROR),
        ("purge", Outcome.ERROR),
        ("", Outcome.ERROR),
    ],
)
def test_each_cache_status_word_counts_as_one_outcome(word: str, outcome: Outcome) -> None:
    metrics = Metrics()
    metrics.record(word, 7, 0.01, "example.com", "http://example.com/f")
    counts = dict(metrics.requests.by_outcome())
    assert counts == {o: (1 if o is outcome else 0) for o in Outcome}
    assert outcome_of(word) is outcome
    assert (metrics.served.cache, metrics.served.upstream) == (
        (7, 0) if outcome is Outcome.HIT else (0, 7)
    )


def test_the_request_counts_have_one_field_per_outcome() -> None:
    """by_outcome() and add() cover every Outcome, each with a field of its own."""
    counts = RequestCounts()
    for i, outcome in enumerate(Outcome):
        for _ in range(i + 1):
            counts.add(outcome)
    assert [n for _, n in counts.by_outcome()] == list(range(1, len(Outcome) + 1))
    assert [o for o, _ in counts.by_outcome()] == list(Outcome)
    assert len(attrs.fields(RequestCounts)) == len(Outcome)
    assert counts.not_hit == counts.miss + counts.partial + counts.revalidated + counts.pass_


def test_a_misspelt_counter_is_an_error_not_an_empty_series() -> None:
    """Regression: with string keys, ``requests["hti"] += 1`` made a new, silent entry.
    The records have slots, so this fails at run time too (and mypy refuses it)."""
    metrics = Metrics()
    with pytest.raises(AttributeError):
        metrics.requests.hti += 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        metrics.served.cahce = 1  # type: ignore[attr-defined]


def test_aborted_responses_are_not_counted_as_misses_in_the_summary_window() -> None:
    metrics = Metrics()
    metrics.record("aborted", 10, 0.01, None, "")
    metrics.record("miss", 20, 0.01, None, "")
    metrics.record("hit", 30, 0.01, None, "")
    assert metrics.window(15) == {
        "hitBytes": 30,
        "missBytes": 20,
        "hitRequests": 1,
        "missRequests": 1,
    }


def test_durations_are_cumulative_buckets_with_the_old_bounds() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.001, 0.2, 100.0):
        metrics.record("hit", 0, seconds, None, "")
    cumulative = metrics.durations.cumulative()
    assert [le for le, _ in cumulative] == [repr(b) for b in DURATION_BUCKETS] + ["+Inf"]
    assert dict(cumulative)["0.001"] == 2 and dict(cumulative)["0.25"] == 3
    assert cumulative[-1] == ("+Inf", 4) and metrics.durations.count == 4
    assert metrics.durations.sum == pytest.approx(100.2015)


async def test_every_family_keeps_its_name_type_and_labels(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", b"x" * 1000)
    dead_parent = "http://127.0.0.1:9"
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], parents=[dead_parent]
    ) as node:
        await get(node.port, origin.url("/f.bin"))
        await get(node.port, origin.url("/f.bin"))
        r = await admin_call(node, "/metrics")
    assert r.status == 200
    assert r.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    text = r.body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: f.type for name, f in families.items()} == {
        name: kind for name, (kind, _) in FAMILIES.items()
    }
    for name, (_, labels) in FAMILIES.items():
        for sample in families[name].samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == labels | extra, (name, sample)
    # the counters keep their exposed names, _total included
    assert "# TYPE mcc_requests_total counter" in text
    assert {s.labels["cache"] for s in families["mcc_requests"].samples} == {
        o.value for o in Outcome
    }
    assert {s.labels["where"] for s in families["mcc_internal_errors"].samples} == {
        "admin",
        "engine",
        "http",
        "warm",
    }
    assert [(s.labels, s.value) for s in families["mcc_parent_up"].samples] == [
        ({"parent": dead_parent}, 0.0)
    ]
    buckets = [s for s in families["mcc_request_duration_seconds"].samples if "le" in s.labels]
    assert [s.labels["le"] for s in buckets] == [repr(b) for b in DURATION_BUCKETS] + ["+Inf"]
    assert buckets[-1].value == 2


async def test_each_admin_server_has_a_registry_of_its_own(origin: Origin, tmp_path: Path) -> None:
    """Two nodes in one process: neither sees the other's counters, and nothing goes
    into prometheus_client's global registry."""
    origin.put("/f.bin", b"y" * 100)
    async with (
        run_node(tmp_path / "a", allow_origins=[origin.authority]) as a,
        run_node(tmp_path / "b", allow_origins=[origin.authority]) as b,
    ):
        for _ in range(3):
            await get(a.port, origin.url("/f.bin"))

        def requests(text: str) -> float:
            return sum(
                s.value
                for f in text_string_to_metric_families(text)
                if f.name == "mcc_requests"
                for s in f.samples
            )

        assert requests(a.admin.render_metrics()) == 3
        assert requests(b.admin.render_metrics()) == 0
        assert a.admin.registry is not b.admin.registry
    assert not any(f.name.startswith("mcc_") for f in REGISTRY.collect())
