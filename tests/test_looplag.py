"""The loop-lag probe (mcc/ops/looplag.py): its arithmetic, and a real stall of a
running node's event loop seen in /metrics and /summary (the probe must not keep
the loop busy: ``wait_all_tasks_blocked`` still returns)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fixtures.origin import Origin
from mcc.ops.looplag import LAG_BUCKETS, LoopLag
from tests.helpers import admin_call, get, run_node

lags = st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1, max_size=300)


@given(lags)
def test_recent_p99_and_max_are_the_nearest_rank_of_the_samples(samples: list[float]) -> None:
    probe = LoopLag()
    for i, lag in enumerate(samples):
        probe.observe(lag, now=100.0 + i * 0.01)
    stats = probe.recent(now=100.0 + len(samples) * 0.01)
    ordered = sorted(samples)
    true_p99 = ordered[math.ceil(0.99 * len(samples)) - 1]
    assert stats.samples == len(samples)
    assert stats.max == ordered[-1] == probe.max
    # the fine buckets round up by at most a quarter, never above the maximum
    assert true_p99 <= stats.p99 <= min(max(true_p99 * 1.2500001, 1e-5), stats.max)
    assert probe.cumulative()[-1] == ("+Inf", len(samples))
    for bound, count in probe.cumulative()[:-1]:
        assert count == sum(1 for s in samples if s <= float(bound))


def test_samples_older_than_the_window_leave_the_recent_figures() -> None:
    probe = LoopLag()
    probe.observe(0.5, now=0.0)  # a stall long ago
    probe.observe(0.001, now=20.0)
    stats = probe.recent(now=20.5, seconds=10)
    assert (stats.samples, stats.max) == (1, 0.001)
    assert probe.max == 0.5  # still the maximum since start
    assert [le for le, _ in probe.cumulative()] == [repr(b) for b in LAG_BUCKETS] + ["+Inf"]


async def test_a_blocked_event_loop_shows_in_metrics_and_summary(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f.bin", b"z" * 1000)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        assert (await get(node.port, origin.url("/f.bin"))).status == 200
        time.sleep(0.08)  # noqa: ASYNC251 -- the stall under test: the loop is held
        await trio.testing.wait_all_tasks_blocked(cushion=0.02)
        for _ in range(3):  # the batch ends at the next I/O wait: a scrape sees it
            text = (await admin_call(node, "/metrics")).body.decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            recent = {
                s.labels["quantile"]: s.value
                for s in families["mcc_loop_lag_recent_seconds"].samples
            }
            if recent["1"] >= 0.07:
                break
        assert recent["1"] >= 0.07, recent
        over = [
            s
            for s in families["mcc_loop_lag_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["le"] == "0.05"
        ]
        count = next(
            s for s in families["mcc_loop_lag_seconds"].samples if s.name.endswith("_count")
        )
        assert count.value - over[0].value >= 1  # at least one wake-up later than 50 ms
        summary = json.loads((await admin_call(node, "/summary")).body)
        assert summary["loopLag"]["maxMs"] >= 70
