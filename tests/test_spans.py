"""A cold range starting inside a block gets its first byte without waiting for the
block's earlier bytes: the block is filled by two fetches side by side (the tail from
the reader's first byte, the head before it), each byte fetched once, the block
stored whole (mcc.engine.spans).

What used to be: the block was fetched from its start, so a range starting 40 KB into
a 64 KiB block waited for those 40 KB first (over a 20 MB/s connection, 2 ms per
40 KB on top of every cold range's time to first byte)."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import h11
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.origin import Fault, Origin, RequestRecord
from mcc.engine.spans import SPLIT_MIN, Coverage
from tests.helpers import get, run_node

B = 64 * 1024  # the nodes' block size
DATA = os.urandom(5 * B + 1000)


# -- the arithmetic ------------------------------------------------------------------

_intervals = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(added=_intervals, probe=st.tuples(st.integers(0, 260), st.integers(0, 260)))
def test_coverage_agrees_with_a_set_of_bytes(
    added: list[tuple[int, int]], probe: tuple[int, int]
) -> None:
    cov, model = Coverage(), set()
    for lo, hi in added:
        cov.add(lo, hi)
        model |= set(range(lo, hi))
    runs = cov.runs
    assert {b for a, z in runs for b in range(a, z)} == model
    assert all(z1 < a2 for (_, z1), (a2, _) in itertools.pairwise(runs))  # merged
    prefix = 0
    while prefix in model:
        prefix += 1
    assert cov.prefix == prefix
    lo, hi = min(probe), max(probe)
    end = lo
    while end in model:
        end += 1
    assert cov.run_end(lo) == end
    gaps = cov.gaps(lo, hi)
    assert {b for a, z in gaps for b in range(a, z)} == set(range(lo, hi)) - model
    assert all(a < z for a, z in gaps)


# -- through a node ------------------------------------------------------------------


def _first_byte(request_range: str | None) -> int | None:
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", request_range or "")
    return int(m.group(1)) if m else None


class HeadsHeld(Origin):
    """Holds every request from a block's start past block 0 (a block's head, asked
    beside its tail) until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()
        self.held = 0

    async def _respond(
        self, conn: h11.Connection, stream: trio.abc.Stream, req: h11.Request, body: bytes
    ) -> bool:
        first = _first_byte(dict(req.headers).get(b"range", b"").decode())
        if first and first % B == 0:
            self.held += 1
            await self.release.wait()
        return await super()._respond(conn, stream, req, body)


async def _wait_held(origin: HeadsHeld, n: int) -> None:
    with trio.fail_after(10):
        while origin.held < n:
            await origin.wait_request("/f")  # (wakes on every request; bounded above)
            await trio.sleep(0.01)


def _ranges_asked(origin: Origin) -> list[str]:
    return [r.headers.get("range", "") for r in origin.requests if r.method == "GET"]


async def _check_stored(node: Any, origin: Origin, url: str, lo: int, hi: int) -> None:
    """Bytes ``lo..hi`` read back right with no further upstream request."""
    await node.cache.wait_idle()
    before = len(origin.requests)
    r = await get(node.port, url, [("range", f"bytes={lo}-{hi}")])
    assert r.status == 206 and r.body == DATA[lo : hi + 1]
    assert len(origin.requests) == before


async def test_a_cold_range_inside_a_block_does_not_wait_for_its_head(tmp_path: Path) -> None:
    origin = HeadsHeld()
    origin.put("/f", DATA)
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            first = 2 * B + 40_000
            with trio.fail_after(20):  # (it used to wait for the held head: forever)
                r = await get(node.port, url, [("range", f"bytes={first}-{3 * B - 1}")])
            assert r.status == 206 and r.body == DATA[first : 3 * B]
            await _wait_held(origin, 1)  # the head was asked beside it, and is held
            # the unknown object was discovered by the tail's request itself
            assert _ranges_asked(origin)[0] == f"bytes={first}-{3 * B - 1}"
            origin.release.set()
            await node.cache.wait_idle()
            assert sorted(_ranges_asked(origin)) == sorted(
                [f"bytes={first}-{3 * B - 1}", f"bytes={2 * B}-{first - 1}"]
            )
            assert origin.body_bytes == B  # each byte of the block fetched once
            # a known object: the same for a block that a later range starts inside
            first = 4 * B + 30_000
            origin.release = trio.Event()
            with trio.fail_after(20):
                r = await get(node.port, url, [("range", f"bytes={first}-{first + 99}")])
            assert r.status == 206 and r.body == DATA[first : first + 100]
            await _wait_held(origin, 2)
            origin.release.set()
            await node.cache.wait_idle()
            assert origin.body_bytes == 2 * B
            assert f"bytes={4 * B}-{first - 1}" in _ranges_asked(origin)
            # the rest of the object, then all of it from the store, byte for byte
            r = await get(node.port, url)
            assert r.status == 200 and r.body == DATA
            await _check_stored(node, origin, url, 0, len(DATA) - 1)
            assert origin.body_bytes == len(DATA)
        nursery.cancel_scope.cancel()


async def test_readers_of_a_split_block_share_its_two_fetches(tmp_path: Path) -> None:
    origin = Origin()
    origin.put("/f", DATA)
    origin.chunk_size = 4096
    origin.faults["/f"] = Fault(body_delay=0.002)  # a block takes ~30 ms: readers overlap
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            r = await get(node.port, url, [("range", "bytes=0-99")])  # the record
            assert r.status == 206
            await node.cache.wait_idle()
            asked_before, bytes_before = len(origin.requests), origin.body_bytes
            starts = [3 * B + 50_000, 3 * B + 20_000, 3 * B, 3 * B + 50_001, 3 * B + 1]
            got: dict[int, bytes] = {}

            async def reader(start: int, delay: float) -> None:
                await trio.sleep(delay)
                r = await get(node.port, url, [("range", f"bytes={start}-{4 * B - 1}")])
                assert r.status == 206
                got[start] = r.body

            with trio.fail_after(30):
                async with trio.open_nursery() as readers:
                    for i, start in enumerate(starts):
                        readers.start_soon(reader, start, 0.005 * i)
            for start in starts:
                assert got[start] == DATA[start : 4 * B], start
            await node.cache.wait_idle()
            asked = _ranges_asked(origin)[asked_before:]
            # the first reader's miss split the block: its tail and its head, no more
            assert sorted(asked) == sorted([f"bytes={3 * B + 50_000}-{4 * B - 1}",
                                            f"bytes={3 * B}-{3 * B + 49_999}"])  # fmt: skip
            assert origin.body_bytes - bytes_before == B
            await _check_stored(node, origin, url, 3 * B, 4 * B - 1)
        nursery.cancel_scope.cancel()


async def test_a_short_head_is_fetched_in_order(tmp_path: Path) -> None:
    origin = Origin()
    origin.put("/f", DATA)
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            first = B + SPLIT_MIN - 1
            r = await get(node.port, url, [("range", f"bytes={first}-{first + 10}")])
            assert r.status == 206 and r.body == DATA[first : first + 11]
            await node.cache.wait_idle()
            assert _ranges_asked(origin) == [f"bytes={B}-{2 * B - 1}"]
        nursery.cancel_scope.cancel()


class HeadsFail(Origin):
    """Answers 503 to every request from a block's start past block 0 (a block's
    head, asked beside its tail) while ``failing``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    async def _respond(
        self, conn: h11.Connection, stream: trio.abc.Stream, req: h11.Request, body: bytes
    ) -> bool:
        first = _first_byte(dict(req.headers).get(b"range", b"").decode())
        if self.failing and first and first % B == 0:
            self.requests.append(RequestRecord(req.method.decode(), req.target.decode(), {}))
            await stream.send_all(
                conn.send(h11.Response(status_code=503, headers=[("content-length", "0")])) or b""
            )
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            return True
        return await super()._respond(conn, stream, req, body)


async def test_a_head_that_fails_costs_its_tail_readers_nothing_and_stores_nothing(
    tmp_path: Path,
) -> None:
    origin = HeadsFail()
    origin.put("/f", DATA)
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[origin.authority], limits={"upstream_retries": 1}
        ) as node:
            url = origin.url("/f")
            first = 2 * B + 40_000
            r = await get(node.port, url, [("range", f"bytes={first}-{3 * B - 1}")])
            assert r.status == 206 and r.body == DATA[first : 3 * B]  # the tail: right
            await node.cache.wait_idle()
            # the block is not whole: not stored; a reader of its head is refused
            assert not node.cache.store.block_map(await node.cache.meta(url), 2, 2)
            r = await get(node.port, url, [("range", f"bytes={2 * B}-{2 * B + 99}")])
            assert r.status >= 500
            # once the origin answers, the block is fetched again, right and stored
            origin.failing = False
            r = await get(node.port, url, [("range", f"bytes={2 * B}-{3 * B - 1}")])
            assert r.status == 206 and r.body == DATA[2 * B : 3 * B]
            await _check_stored(node, origin, url, 2 * B, 3 * B - 1)
        nursery.cancel_scope.cancel()
