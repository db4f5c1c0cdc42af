"""Regressions of the seams: the store keeps what an object needs across restarts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import mcc
from fixtures.origin import Fault, Origin

DATA = os.urandom(5 * 65536 + 777)


async def _read(cache: mcc.Cache, url: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([c async for c in cache.read(url, start, end)])


@pytest.mark.parametrize(("first", "then"), [("128KiB", "64KiB"), ("64KiB", "128KiB")])
async def test_reopening_with_another_block_size_keeps_stored_objects_right(
    origin: Origin, tmp_path: Path, first: str, then: str
) -> None:
    origin.put("/old", DATA)
    origin.put("/new", DATA[::-1])
    opts: dict[str, Any] = {"cache_dir": tmp_path, "allow_origins": [origin.authority]}
    async with mcc.open_cache(block_size=first, **opts) as cache:
        assert await _read(cache, origin.url("/old")) == DATA
        await cache.wait_idle()
    fetched = len(origin.requests)
    async with mcc.open_cache(block_size=then, **opts) as cache:
        # every range, including ones across the old and the new block boundaries
        for start, end in [(65536, 196607), (0, 65535), (131071, 131072), (1, len(DATA) - 2)]:
            assert await _read(cache, origin.url("/old"), start, end) == DATA[start : end + 1]
        assert await _read(cache, origin.url("/old")) == DATA
        assert len(origin.requests) == fetched  # all of it from the store
        old = cache.store.get_object(cache.resolve(origin.url("/old")))
        assert old is not None and old.block_size == (131072 if first == "128KiB" else 65536)
        # a new object takes the new size
        assert await _read(cache, origin.url("/new")) == DATA[::-1]
        await cache.wait_idle()
        new = cache.store.get_object(cache.resolve(origin.url("/new")))
        assert new is not None and new.block_size == (65536 if then == "64KiB" else 131072)


async def test_a_partly_cached_redirected_object_reads_whole_after_a_restart(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/real", DATA)
    origin.faults["/moved"] = Fault(redirect=origin.url("/real"))
    opts: dict[str, Any] = {
        "cache_dir": tmp_path,
        "allow_origins": [origin.authority],
        "block_size": "64KiB",
    }
    async with mcc.open_cache(readahead_blocks=0, **opts) as cache:
        assert await _read(cache, origin.url("/moved"), 0, 100) == DATA[:101]
        await cache.wait_idle()
        record = cache.store.get_object(cache.resolve(origin.url("/moved")))
        assert record is not None and record.fetch_url == origin.url("/real")
    redirects = origin.count("/moved")
    async with mcc.open_cache(**opts) as cache:
        assert await _read(cache, origin.url("/moved")) == DATA
    assert origin.count("/moved") == redirects  # block fetches went where it lives
