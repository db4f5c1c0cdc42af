"""Fills shared by two engines on one cache directory, as two workers of a node are
(mcc/engine/claimed.py, issue 17 item 1), in one process: flock claims exclude open
files, not processes, so two SharedStores meet as two workers do."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from fixtures.origin import Fault, Origin
from mcc import Cache
from mcc.config import load_config
from mcc.engine.opening import open_shared_cache
from mcc.store.blobs import DriveInfo
from mcc.store.shared import SharedStore

B = 64 * 1024
DATA = os.urandom(6 * B + 123)


@pytest.fixture
async def pair(origin: Origin, tmp_path: Path) -> AsyncIterator[tuple[Cache, Cache]]:
    config = load_config(
        overrides={
            "drives": [{"path": str(tmp_path / "c")}],
            "allow_origins": [origin.authority],
            "block_size": "64KiB",
            "node_id": "w",
            "workers": 2,
        }
    )
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_shared_cache(config, recover=True))
        b = await stack.enter_async_context(open_shared_cache(config, recover=False))
        yield a, b


async def _read(cache: Cache, url: str, out: list[bytes]) -> None:
    out.append(b"".join([piece async for piece in cache.read(url)]))


async def test_two_engines_fetch_each_block_once(origin: Origin, pair: tuple[Cache, Cache]) -> None:
    origin.put("/o.bin", DATA)
    origin.chunk_size = 8 * 1024
    origin.faults["/o.bin"] = Fault(body_delay=0.002)  # fills last long enough to meet
    got: list[bytes] = []
    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(_read, pair[i % 2], origin.url("/o.bin"), got)
    assert got == [DATA] * 20
    blocks = -(-len(DATA) // B)
    assert origin.count("/o.bin") == blocks, [r.headers.get("range") for r in origin.requests]
    for cache in pair:  # both read it back from the store
        assert b"".join([p async for p in cache.read(origin.url("/o.bin"))]) == DATA
    assert origin.count("/o.bin") == blocks


async def test_purge_in_one_is_seen_by_the_other(origin: Origin, pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    origin.put("/p.bin", DATA[: 2 * B])
    got: list[bytes] = []
    await _read(a, origin.url("/p.bin"), got)
    await a.wait_idle()
    await _read(b, origin.url("/p.bin"), got)  # a hit in b: memo and fds filled
    assert origin.count("/p.bin") == 2
    new = os.urandom(2 * B)
    origin.put("/p.bin", new)
    assert await a.purge(origin.url("/p.bin"))
    await _read(b, origin.url("/p.bin"), got)
    assert got == [DATA[: 2 * B], DATA[: 2 * B], new]


async def test_an_eviction_by_one_is_seen_by_the_other(origin: Origin, tmp_path: Path) -> None:
    config = load_config(
        overrides={
            "drives": [{"path": str(tmp_path / "c"), "max_size": "1MiB", "min_free": "0"}],
            "allow_origins": [origin.authority],
            "block_size": "64KiB",
            "node_id": "w",
            "workers": 2,
        }
    )
    n = 10  # blocks per object: two are past the high-water mark of 1 MiB
    first, second = os.urandom(n * B), os.urandom(n * B)
    origin.put("/e1.bin", first)
    origin.put("/e2.bin", second)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_shared_cache(config, recover=True))
        b = await stack.enter_async_context(open_shared_cache(config, recover=False))
        got: list[bytes] = []
        await _read(a, origin.url("/e1.bin"), got)
        await a.wait_idle()
        await _read(b, origin.url("/e1.bin"), got)  # a hit in b: its maps and fds filled
        assert origin.count("/e1.bin") == n
        await _read(a, origin.url("/e2.bin"), got)
        await a.wait_idle()
        await a.evict()
        meta = await b.meta(origin.url("/e1.bin"))
        evicted = set(range(n)) - set(a.store.block_map(meta, 0, n - 1))
        assert evicted  # (least recently used first: e1's blocks)
        assert a.store.stored_bytes() <= 1024 * 1024 * 0.9
        assert b.store.stored_bytes() == a.store.stored_bytes()  # totals from the index
        asked = len(origin.requests)
        await _read(b, origin.url("/e1.bin"), got)  # evicted blocks: fetched, not served stale
        again: set[int] = set()
        for r in origin.requests[asked:]:
            lo, hi = r.headers["range"].removeprefix("bytes=").split("-")
            again.update(range(int(lo) // B, int(hi) // B + 1))
        assert evicted <= again, (evicted, again)
        assert got == [first, first, second, first]


async def test_an_fd_two_readers_share_outlives_the_first_release(tmp_path: Path) -> None:
    # regression: another worker's change made the store forget its cached fds, and
    # the first of two readers sharing one fd closed it under the second (EBADF)
    drives = [DriveInfo(tmp_path, 10**9, 0)]
    a = SharedStore(drives, block_size=B, durable=False)
    b = SharedStore(drives, block_size=B, durable=False, recover=False)
    try:
        digest = a.blobs.put(DATA[:B])
        fd1, fd2 = await b.open_block(digest), await b.open_block(digest)
        assert fd1 is not None and fd1 == fd2  # one cached fd, two users
        a.generation.bump()  # a change by another worker ...
        b.see_changes()  # ... seen by b
        b.release(digest, fd1)
        assert os.pread(fd2, B, 0) == DATA[:B]  # still open for the second reader
        again = await b.open_block(digest)
        assert again is not None and again != fd2  # a fresh fd from now on
        b.release(digest, again)
        b.release(digest, fd2)
        with pytest.raises(OSError):  # closed by its last user
            os.fstat(fd2)
    finally:
        a.close()
        b.close()


async def test_ranges_inside_blocks_and_whole_reads_meet_in_order_fills(
    origin: Origin, pair: tuple[Cache, Cache]
) -> None:
    """With several workers a block's fill file grows from the block's start (a
    follower in another worker reads it up to its size), so a cold range starting
    inside a block is not split into tail-first fetches there (mcc.engine.runs):
    every reader gets right bytes and every byte comes from the origin once."""
    origin.put("/m.bin", DATA)
    origin.chunk_size = 8 * 1024
    origin.faults["/m.bin"] = Fault(body_delay=0.01)  # a block takes ~80 ms
    starts = [B // 2, 3 * B + 40_000, 0, 5 * B + 100, B + 20_000, 0, B, 3 * B]
    got: dict[int, bytes] = {}

    async def one(i: int, start: int) -> None:
        if i % 2:  # the second worker's readers come while the first one's fills run
            await trio.sleep(0.03)
        pieces = [p async for p in pair[i % 2].read(origin.url("/m.bin"), start)]
        got[i] = b"".join(pieces)

    async with trio.open_nursery() as n:
        for i, start in enumerate(starts):
            n.start_soon(one, i, start)
    assert [got[i] for i in range(len(starts))] == [DATA[s:] for s in starts]
    assert origin.body_bytes == len(DATA), [r.headers.get("range") for r in origin.requests]
    for cache in pair:
        assert b"".join([p async for p in cache.read(origin.url("/m.bin"))]) == DATA
    assert origin.body_bytes == len(DATA)


async def test_cold_ranges_over_several_blocks_in_two_workers(
    origin: Origin, pair: tuple[Cache, Cache]
) -> None:
    """A discovery asks through the block holding its range's last byte (one request
    for the range: mcc.engine.discovery), from its first block's start in a shared
    store; readers in both workers get right bytes, each byte fetched once."""
    origin.put("/r.bin", DATA)
    origin.chunk_size = 8 * 1024
    origin.faults["/r.bin"] = Fault(body_delay=0.005)
    spans = [(B + 40_000, 3 * B + 10), (2 * B + 5, 5 * B), (0, B + 1), (3 * B, len(DATA) - 1)]
    got: dict[int, bytes] = {}

    async def one(i: int, lo: int, hi: int) -> None:
        await trio.sleep(0.01 * i)
        pieces = [p async for p in pair[i % 2].read(origin.url("/r.bin"), lo, hi)]
        got[i] = b"".join(pieces)

    async with trio.open_nursery() as n:
        for i, (lo, hi) in enumerate(spans):
            n.start_soon(one, i, lo, hi)
    assert [got[i] for i in range(len(spans))] == [DATA[lo : hi + 1] for lo, hi in spans]
    asked = [r.headers.get("range") for r in origin.requests]
    assert asked[0] == f"bytes={B}-{4 * B - 1}", asked  # from its block's start
    assert origin.body_bytes == len(DATA), asked
    for cache in pair:
        assert b"".join([p async for p in cache.read(origin.url("/r.bin"))]) == DATA
    assert origin.body_bytes == len(DATA)
