"""The engine as a library, against the real test origin on loopback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings

import mcc
from fixtures.origin import Fault, Origin
from tests.strategies import block_sizes, size_and_range


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


def open_test_cache(origin: Origin, cache_dir: Path, **kw: Any) -> Any:
    kw.setdefault("block_size", "64KiB")
    return mcc.open_cache(cache_dir=cache_dir, allow_origins=[origin.authority], node_id="t", **kw)


@settings(max_examples=40, deadline=None)
@given(case=size_and_range(), block_size=block_sizes)
async def test_any_range_reads_back_identical(case: tuple[int, int, int], block_size: int) -> None:
    # pytest-trio runs each example in its own trio run: the origin starts in here
    size, start, end = case
    data = os.urandom(size)
    origin = Origin()
    origin.put("/h", data)
    url = "/h"
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        url = origin.url("/h")
        with tempfile.TemporaryDirectory() as d:
            async with open_test_cache(origin, Path(d), block_size=block_size) as cache:
                got = await collect(cache.read(url, start, end))
                assert got == data[start : end + 1]
                whole = await collect(cache.read(url))  # cold tail + warm part
                assert whole == data
                await cache.wait_idle()
                assert (await cache.stat(url)).cached
                n = len(origin.requests)
                assert await collect(cache.read(url, start, end)) == data[start : end + 1]
                assert len(origin.requests) == n  # served from disk
        nursery.cancel_scope.cancel()


async def test_empty_and_tiny_objects(origin: Origin, tmp_path: Path) -> None:
    origin.put("/empty", b"")
    origin.put("/one", b"x")
    async with open_test_cache(origin, tmp_path) as cache:
        assert await collect(cache.read(origin.url("/empty"))) == b""
        info = await cache.stat(origin.url("/empty"))
        assert info.size == 0 and info.cached
        assert await collect(cache.read(origin.url("/one"))) == b"x"
        with pytest.raises(mcc.RangeNotSatisfiable):
            await collect(cache.read(origin.url("/one"), 5, 9))


async def test_fifty_readers_one_upstream_request(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    origin.put("/one-block", data)
    origin.chunk_size = 4096
    origin.faults["/one-block"] = Fault(body_delay=0.002)  # the body takes ~30 ms
    results: list[bytes] = []
    async with open_test_cache(origin, tmp_path) as cache:
        first_cancelled = trio.Event()

        async def first_reader() -> None:
            with trio.CancelScope() as scope:
                async for _ in cache.read(origin.url("/one-block")):
                    scope.cancel()  # hang up midway, after the first chunk
            first_cancelled.set()

        async def reader() -> None:
            results.append(await collect(cache.read(origin.url("/one-block"))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_reader)
            await trio.sleep(0.001)
            for _ in range(49):
                nursery.start_soon(reader)
        assert first_cancelled.is_set()
        await cache.wait_idle()
        assert (await cache.stat(origin.url("/one-block"))).cached
        assert cache.statistics().flight_joins >= 49
    assert results == [data] * 49
    assert origin.count("/one-block") == 1


async def test_orphaned_fetch_still_stores_the_block(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    origin.put("/o", data)
    origin.chunk_size = 8192
    origin.faults["/o"] = Fault(body_delay=0.001)
    async with open_test_cache(origin, tmp_path) as cache:
        with trio.move_on_after(0.01):
            await collect(cache.read(origin.url("/o"), 0, 1000))
        await cache.wait_idle()
        n = len(origin.requests)
        assert await collect(cache.read(origin.url("/o"), 0, 1000)) == data[:1001]
        assert len(origin.requests) == n


async def test_changed_object_never_mixes_versions(origin: Origin, tmp_path: Path) -> None:
    old, new = os.urandom(300_000), os.urandom(300_000)
    origin.put("/v", old)
    async with open_test_cache(origin, tmp_path, readahead_blocks=0) as cache:
        url = origin.url("/v")
        assert await collect(cache.read(url, 0, 10)) == old[:11]
        await cache.wait_idle()
        origin.put("/v", new)  # new bytes, new ETag
        got = b""
        with pytest.raises(mcc.VersionChanged):
            async for chunk in cache.read(url, 0, len(old) - 1):
                got += chunk
        assert got == old[: len(got)]  # whatever came before the error was old, unmixed
        assert await collect(cache.read(url)) == new
        await cache.wait_idle()
        assert await collect(cache.read(url, 0, 10)) == new[:11]


async def test_etag_changing_between_blocks_with_range_honoured(
    origin: Origin, tmp_path: Path
) -> None:
    """An origin that ignores If-Range and answers 206 from a new version."""
    origin.put("/e", os.urandom(200_000))
    async with open_test_cache(origin, tmp_path, readahead_blocks=0) as cache:
        url = origin.url("/e")
        await collect(cache.read(url, 0, 0))
        await cache.wait_idle()
        new = os.urandom(200_000)
        origin.put("/e", new, etag='"changed"')
        origin.faults["/e"] = Fault(ignore_if_range=True)
        with pytest.raises(mcc.VersionChanged):
            await collect(cache.read(url, 100_000, 100_010))
        assert await collect(cache.read(url, 100_000, 100_010)) == new[100_000:100_011]


async def test_origin_ignoring_range_is_cut_into_blocks(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(500_000)
    origin.put("/norange", data)
    origin.faults["/norange"] = Fault(ignore_range=True)
    async with open_test_cache(origin, tmp_path, readahead_blocks=0) as cache:
        url = origin.url("/norange")
        assert await collect(cache.read(url, 70_000, 70_100)) == data[70_000:70_101]
        await cache.wait_idle()
        info = await cache.stat(url)
        assert info.cached  # every block was cut from the one 200 body
        n = len(origin.requests)
        assert await collect(cache.read(url)) == data
        assert len(origin.requests) == n


async def test_upstream_error_reaches_every_waiter(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    origin.put("/r", data)
    async with open_test_cache(origin, tmp_path, limits={"upstream_retries": 0}) as cache:
        url = origin.url("/r")
        await collect(cache.read(url, 0, 0))
        await cache.wait_idle()
        origin.faults["/r"] = Fault(reset_after=1000)
        errors = []

        async def reader() -> None:
            try:
                await collect(cache.read(url, 70_000, 130_000))
            except mcc.UpstreamError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(reader)
        assert len(errors) == 5
        await cache.wait_idle()
        assert (await cache.stat(url)).cached_blocks == 1  # nothing partial stored


async def test_retry_resumes_after_reset(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    origin.put("/retry", data)
    async with open_test_cache(origin, tmp_path) as cache:
        url = origin.url("/retry")
        await collect(cache.read(url, 0, 0))
        await cache.wait_idle()
        origin.faults["/retry"] = Fault(reset_after=10_000, fail_times=1)
        assert await collect(cache.read(url, 65_536, 131_071)) == data[65_536:131_072]
        resumed = [
            r for r in origin.requests if r.headers.get("range", "").startswith("bytes=75536")
        ]
        assert resumed, "the retry asked only for the bytes still missing"


async def test_warm_purge_and_statistics(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(150_000)
    origin.put("/w", data)
    async with open_test_cache(origin, tmp_path) as cache:
        url = origin.url("/w")
        info = await cache.warm(url)
        assert info.cached and info.total_blocks == 3
        before = cache.statistics()
        assert await collect(cache.read(url)) == data
        after = cache.statistics()
        assert after.hits == before.hits + 1
        assert after.bytes_from_cache - before.bytes_from_cache == len(data)
        assert await cache.purge(url)
        assert not await cache.purge(url)
        assert cache.index.all_digests() == {}
        assert not any(cache.blobs.iter_digests())


async def test_identical_blocks_are_stored_once(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(65_536) * 3
    origin.put("/a", data)
    origin.put("/b", data)
    async with open_test_cache(origin, tmp_path) as cache:
        await cache.warm(origin.url("/a"))
        await cache.warm(origin.url("/b"))
        assert len(list(cache.blobs.iter_digests())) == 1


async def test_not_allowed_and_not_cacheable(origin: Origin, tmp_path: Path) -> None:
    origin.put("/nostore", b"x", headers=(("cache-control", "no-store"),))
    async with open_test_cache(origin, tmp_path) as cache:
        with pytest.raises(mcc.BadRequest) as info:
            await cache.stat("http://example.org/x")
        assert info.value.status_hint == 403
        with pytest.raises(mcc.NotCacheable):
            await cache.stat(origin.url("/nostore"))
        with pytest.raises(mcc.NotCacheable):
            await cache.stat(origin.url("/missing"))


async def test_canonical_host_shares_one_entry(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    origin.put("/c", data)
    async with mcc.open_cache(
        cache_dir=tmp_path,
        block_size="64KiB",
        allow_origins=[origin.authority, f"localhost:{origin.port}"],
        canonical_hosts={"localhost": "127.0.0.1"},
    ) as cache:
        await cache.warm(origin.url("/c"))
        n = len(origin.requests)
        alias = f"http://localhost:{origin.port}/c"
        assert await collect(cache.read(alias)) == data
        assert len(origin.requests) == n
