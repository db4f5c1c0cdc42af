"""Adaptive read-ahead (mcc.engine.readahead) and the per-host cap on upstream fetches.

The window's arithmetic is tested with made-up clocks; the engine and the server are
tested against the real test origin on loopback, counting at the origin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.origin import Fault, Origin
from mcc.engine.readahead import _GAIN, HostSlots, Window, host_of
from tests.helpers import get, run_node
from tests.test_engine import collect, open_test_cache

KiB = 1024


def _drive(
    window: Window,
    rate_at_depth: Callable[[int], float],
    blocks: int,
    *,
    starved: bool = True,
    fills: bool = False,
) -> list[int]:
    """Read ``blocks`` blocks, each taking ``1 / rate_at_depth(depth)`` seconds (and,
    with ``fills``, each fill taking as long as ``depth + 1`` of them, as it does with
    ``depth + 1`` fills sharing the pace); returns the depth after each block."""
    now = 0.0
    depths = []
    for _ in range(blocks):
        dt = 1.0 / rate_at_depth(window.depth)
        now += dt
        took = dt * (window.depth + 1) if fills else None
        window.step(now, starved=starved, fill_seconds=took)
        depths.append(window.depth)
    return depths


@pytest.mark.parametrize("fills", [False, True])
def test_window_grows_to_its_ceiling_while_each_connection_is_the_limit(fills: bool) -> None:
    window = Window(2, 7)
    _drive(window, lambda d: float(d + 1), 400, fills=fills)  # each connection adds its share
    assert window.depth == 7
    assert window.grown_by == 5
    assert window.held == 0


@pytest.mark.parametrize("fills", [False, True])
def test_window_stops_where_more_connections_stop_helping(fills: bool) -> None:
    # each connection brings 1 block/s, the link carries 4: a 5th connection is wasted
    window = Window(1, 12)
    depths = _drive(window, lambda d: float(min(d + 1, 4)), 600, fills=fills)
    assert max(depths) == 4  # tried one more than pays ...
    assert window.depth in (3, 4)  # ... gave it back, and only retries now and then
    assert depths[-200:].count(3) > depths[-200:].count(4)


def test_window_does_not_grow_for_a_client_slower_than_upstream() -> None:
    window = Window(4, 7)
    _drive(window, lambda d: float(d + 1), 400, starved=False)
    assert window.depth == 4 and window.grown_by == 0


def test_read_ahead_off_stays_off() -> None:
    window = Window(0, 7)
    _drive(window, lambda d: float(d + 1), 100)
    assert window.depth == 0 and window.grown_by == 0 and window.off


def test_window_starts_within_its_ceiling() -> None:
    assert Window(6, 3).depth == 3
    assert Window(6, -1).depth == 0  # a cap of 0 leaves no room for read-ahead


@settings(max_examples=200)
@given(
    start=st.integers(0, 10),
    ceiling=st.integers(-1, 12),
    steps=st.lists(
        st.tuples(st.floats(0.0, 5.0), st.booleans(), st.none() | st.floats(0.0, 5.0)),
        max_size=150,
    ),
)
def test_window_invariants(
    start: int, ceiling: int, steps: list[tuple[float, bool, float | None]]
) -> None:
    window = Window(start, ceiling)
    now = 0.0
    ever_starved = False
    for dt, starved, took in steps:
        now += dt
        before, held = window.depth, window.held
        window.step(now, starved=starved, fill_seconds=took)
        ever_starved |= starved
        assert 0 <= window.depth <= max(ceiling, 0)
        assert window.depth <= before + 1
        if held:
            assert window.depth <= before  # holding: no growth
    if not ever_starved:
        assert window.grown_by == 0


def test_gain_is_a_fraction() -> None:
    assert 0 < _GAIN < 1


def test_host_of() -> None:
    assert host_of("http://Example.COM:8080/a/b?x") == "example.com:8080"
    assert host_of("https://h/") == "h"
    assert host_of("http://h?q") == "h"


async def test_host_slots_cap_and_resize() -> None:
    slots = HostSlots(2)
    a = slots.slot("a")
    assert slots.slot("a") is a and a.total_tokens == 2
    slots.resize(1)
    assert a.total_tokens == 1
    slots.resize(0)  # 0: no pooling, and no cap either
    assert a.total_tokens == float("inf")
    assert slots.in_use("a") == 0 and slots.in_use("never") == 0


async def test_sequential_read_grows_past_readahead_blocks_on_a_throttled_origin(
    origin: Origin, tmp_path: Path
) -> None:
    # 48 blocks of 64 KiB, each sent in 8 KiB chunks with a pause: every connection is
    # slow, so the reader keeps catching up with its fills and the window grows
    data = os.urandom(48 * 64 * KiB)
    origin.put("/slow.bin", data)
    origin.chunk_size = 8 * KiB
    origin.faults["/slow.bin"] = Fault(body_delay=0.004)
    async with open_test_cache(
        origin, tmp_path, readahead_blocks=1, limits={"max_parallel_fetches": 6}
    ) as cache:
        assert await collect(cache.read(origin.url("/slow.bin"))) == data
        await cache.wait_idle()
    # a fixed read-ahead of 1 keeps 2 fetches in flight (the block read and the next)
    assert origin.max_in_flight > 2
    assert origin.max_in_flight <= 6


async def test_readahead_zero_fetches_one_block_at_a_time(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(12 * 64 * KiB)
    origin.put("/z.bin", data)
    origin.chunk_size = 8 * KiB
    origin.faults["/z.bin"] = Fault(body_delay=0.002)
    async with open_test_cache(origin, tmp_path, readahead_blocks=0) as cache:
        assert await collect(cache.read(origin.url("/z.bin"))) == data
    assert origin.max_in_flight == 1


async def test_upstream_connections_per_host_never_exceeds_the_cap(
    origin: Origin, tmp_path: Path
) -> None:
    # Delivery Optimization's pattern (many range requests at once) plus whole-object
    # readers whose read-ahead would like 8 connections each: the origin counts the
    # connections open at once, and never sees more than the cap
    objects = {f"/p{i}.bin": os.urandom(16 * 64 * KiB) for i in range(4)}
    for path, body in objects.items():
        origin.put(path, body)
        origin.faults[path] = Fault(body_delay=0.002)
    origin.chunk_size = 16 * KiB
    cap = 3
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        readahead_blocks=6,
        limits={"upstream_connections_per_host": cap, "max_parallel_fetches": 8},
    ) as node:
        results: dict[str, bytes] = {}

        async def whole(path: str) -> None:
            r = await get(node.port, origin.url(path))
            assert r.status == 200
            results[path] = r.body

        async def piece(path: str, k: int) -> None:
            lo, hi = k * 64 * KiB, (k + 2) * 64 * KiB - 1
            r = await get(node.port, origin.url(path), [("range", f"bytes={lo}-{hi}")])
            assert r.status == 206
            assert r.body == objects[path][lo : hi + 1]

        async with trio.open_nursery() as nursery:
            for path in ("/p0.bin", "/p1.bin"):
                nursery.start_soon(whole, path)
            for path in ("/p2.bin", "/p3.bin"):
                for k in range(0, 14, 2):
                    nursery.start_soon(piece, path, k)
        await node.cache.wait_idle()
    assert results == {p: objects[p] for p in ("/p0.bin", "/p1.bin")}
    assert origin.max_open_connections <= cap
    assert origin.max_in_flight <= cap
    assert origin.max_in_flight >= 2  # the test did run fetches side by side


async def test_a_reload_resizes_the_per_host_cap(origin: Origin, tmp_path: Path) -> None:
    # SIGHUP hands the engine a new config: fills from then on get the new cap (two
    # readers of two objects, no read-ahead: only the cap keeps them to one connection)
    bodies = {f"/r{i}.bin": os.urandom(6 * 64 * KiB) for i in range(2)}
    for path, body in bodies.items():
        origin.put(path, body)
        origin.faults[path] = Fault(body_delay=0.002)
    origin.chunk_size = 16 * KiB
    async with open_test_cache(
        origin, tmp_path, readahead_blocks=0, limits={"upstream_connections_per_host": 8}
    ) as cache:
        config = attrs.evolve(
            cache.config, limits=attrs.evolve(cache.config.limits, upstream_connections_per_host=1)
        )
        cache.reconfigure(config)
        got: dict[str, bytes] = {}

        async def read(path: str) -> None:
            got[path] = await collect(cache.read(origin.url(path)))

        async with trio.open_nursery() as nursery:
            for path in bodies:
                nursery.start_soon(read, path)
        await cache.wait_idle()
    assert got == bodies
    assert origin.max_open_connections == 1


def test_a_window_that_is_off_never_changes() -> None:
    # one-block reads share one window: stepping it must leave it as it was
    window = Window(0, 0)
    for i in range(50):
        window.step(float(i), starved=True, fill_seconds=1.0)
    assert (window.depth, window.grown_by, window.held, window.off) == (0, 0, 0, True)
