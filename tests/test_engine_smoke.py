from __future__ import annotations

import os

import mcc
from fixtures.origin import Origin


async def test_read_whole_and_ranges(origin: Origin, cache: mcc.Cache) -> None:
    data = os.urandom(300_000)
    origin.put("/a.bin", data)
    url = origin.url("/a.bin")
    got = b"".join([c async for c in cache.read(url)])
    assert got == data
    await cache.wait_idle()
    n = len(origin.requests)
    got2 = b"".join([c async for c in cache.read(url, 1000, 200_000)])
    assert got2 == data[1000:200_001]
    assert len(origin.requests) == n
    assert cache.statistics().hits == 1
    info = await cache.stat(url)
    assert info.cached and info.size == len(data)
