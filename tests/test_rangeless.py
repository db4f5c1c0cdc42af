"""Origins that ignore Range (issue 15): the first whole-object answer streams once
into every block, concurrent readers join it, and the object is remembered as sent
whole, so a whole GET plus scattered ranges cost about the object once upstream.

What used to break: a 30 MB object from ``python -m http.server`` cost 10-12 whole
GETs, one per concurrent miss and per read-ahead block."""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from fixtures.origin import Fault, Origin
from tests.helpers import get, run_node

SIZE = 1024 * 1024 + 12_345  # 17 blocks of 64 KiB, the last one short
DATA = os.urandom(SIZE)


def _ranges(seed: int, n: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        a = rnd.randrange(SIZE)
        out.append((a, min(SIZE - 1, a + rnd.randrange(1, 200_000))))
    return out


async def test_a_rangeless_origin_costs_about_the_object_once(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    origin.faults["/f"] = Fault(ignore_range=True)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f")

        async def whole() -> None:
            r = await get(node.port, url)
            assert r.status == 200 and r.body == DATA

        async def part(a: int, b: int) -> None:
            r = await get(node.port, url, [("range", f"bytes={a}-{b}")])
            assert r.status == 206 and r.body == DATA[a : b + 1], (a, b)

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                clients.start_soon(whole)
                for a, b in _ranges(1, 8):
                    clients.start_soon(part, a, b)
            await node.cache.wait_idle()
            for a, b in _ranges(2, 8):  # later reads, scattered
                await part(a, b)
        assert origin.body_bytes <= 1.1 * SIZE, origin.body_bytes / SIZE


async def test_later_misses_of_a_rangeless_object_cost_one_whole_fetch(
    origin: Origin, tmp_path: Path
) -> None:
    """Scattered misses at once on an object known to be sent whole share one fetch."""
    origin.put("/f", DATA)
    origin.faults["/f"] = Fault(ignore_range=True, reset_after=300_000)  # the first breaks
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"upstream_retries": 0}
    ) as node:
        url = origin.url("/f")
        r = await get(node.port, url, [("range", "bytes=0-9")])
        assert r.status == 206 and r.body == DATA[:10]
        await node.cache.wait_idle()
        meta = node.cache.index.get_object(node.cache.resolve(url))
        assert meta is not None
        assert len(node.cache.index.get_blocks(meta.key, meta.version, 0, 100)) < 17
        origin.faults["/f"] = Fault(ignore_range=True)
        gets, before = origin.count("/f"), origin.body_bytes

        async def part(a: int, b: int) -> None:
            r = await get(node.port, url, [("range", f"bytes={a}-{b}")])
            assert r.status == 206 and r.body == DATA[a : b + 1], (a, b)

        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for a, b in _ranges(3, 8):
                    clients.start_soon(part, a, b)
        assert origin.count("/f") - gets <= 1
        assert origin.body_bytes - before <= SIZE
