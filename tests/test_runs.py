"""Runs (mcc.engine.runs): a sequential reader's read-ahead asks upstream for several
consecutive blocks per request, once more connections stop paying; each byte is still
fetched once, every request stays within the caps, and every block is stored.

What used to be: one upstream request per block, whatever the link: with 1 MiB blocks
on a fast origin about a fifth of a cold download's CPU went to starting requests."""

from __future__ import annotations

import os
import re
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.origin import Fault, Origin
from mcc.engine.readahead import Window
from mcc.engine.runs import run_blocks
from tests.helpers import get, run_node

KiB = 1024
B = 64 * KiB


def test_run_blocks_spreads_requests_over_8_mib_at_most_8_blocks() -> None:
    assert run_blocks(64 * KiB) == 8
    assert run_blocks(1024 * KiB) == 8
    assert run_blocks(4096 * KiB) == 2
    assert run_blocks(64 * 1024 * KiB) == 1


@settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(0, 8),
    ceiling=st.integers(0, 8),
    max_run=st.integers(1, 8),
    steps=st.lists(st.booleans(), max_size=300),
)
def test_a_window_doubles_its_run_only_while_its_depth_holds(
    depth: int, ceiling: int, max_run: int, steps: list[bool]
) -> None:
    window = Window(depth, ceiling, 0.0, max_run=max_run)
    now = 0.0
    for starved in steps:
        before = (window.depth, window.run, window.grown_by)
        now += 1.0
        window.step(now, starved=starved, fill_seconds=1.0)
        assert 1 <= window.run <= max(1, max_run)
        assert window.ahead == (window.depth + 1) * window.run - 1
        if window.off:
            assert (window.run, window.depth) == (1, 0)
        if window.run != before[1]:  # it doubled: in an epoch where depth did not grow
            assert window.run == min(max_run, before[1] * 2)
            assert window.grown_by == before[2]


def _span(rng: str) -> tuple[int, int]:
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
    assert m, rng
    return int(m.group(1)), int(m.group(2))


async def test_a_whole_read_asks_for_runs_of_blocks_within_the_caps(tmp_path: Path) -> None:
    blocks = 64
    data = os.urandom(blocks * B)
    origin = Origin()
    origin.put("/big", data)
    origin.chunk_size = 16 * KiB
    origin.faults["/big"] = Fault(body_delay=0.0005)
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c",
            allow_origins=[origin.authority],
            readahead_blocks=1,
            limits={"max_parallel_fetches": 2, "upstream_connections_per_host": 2},
        ) as node:
            r = await get(node.port, origin.url("/big"))
            assert r.status == 200 and r.body == data
            await node.cache.wait_idle()
            asked = sorted(_span(q.headers["range"]) for q in origin.requests)
            # every byte once: the spans tile the object, each from a block's start
            assert origin.body_bytes == len(data)
            assert [a for a, _ in asked][1:] == [z + 1 for _, z in asked][:-1]
            assert asked[0][0] == 0 and asked[-1][1] == len(data) - 1
            assert all(a % B == 0 for a, _ in asked)
            # the window could not grow (2 connections at most): its runs grew instead
            assert max(z - a + 1 for a, z in asked) == run_blocks(B) * B
            assert len(asked) < blocks // 2
            assert origin.max_open_connections <= 2 and origin.max_in_flight <= 2
            # stored: read back with no request
            n = len(origin.requests)
            r = await get(node.port, origin.url("/big"))
            assert r.body == data and len(origin.requests) == n
        nursery.cancel_scope.cancel()
