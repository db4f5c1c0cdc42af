"""A cold range's discovery asks through the block holding the range's last byte
(at most a read-ahead run of blocks), so the blocks after its first arrive in the
same response body rather than each by a request asked once the discovery answered.

What used to be: the discovery asked from the range's first byte to the end of its
block only; block k+1 was a request of its own, started after the answer, so a cold
1 MiB range's last byte came a round trip (and a request) late."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio
from hypothesis import given
from hypothesis import strategies as st

from fixtures.origin import Fault, Origin
from mcc.engine.runs import run_blocks
from mcc.http.ranges import last_byte
from tests.helpers import get, run_node

B = 64 * 1024  # the nodes' block size
DATA = os.urandom(5 * B + 1000)  # 6 blocks, the last one 1000 bytes


def _gets(origin: Origin) -> list[str]:
    return [r.headers.get("range", "") for r in origin.requests if r.method == "GET"]


async def _read_back(node: Any, origin: Origin, url: str, lo: int, hi: int) -> None:
    """Bytes ``lo..hi`` read back right from the store, no further upstream request."""
    await node.cache.wait_idle()
    before = len(origin.requests)
    r = await get(node.port, url, [("range", f"bytes={lo}-{hi}")])
    assert r.status == 206 and r.body == DATA[lo : hi + 1]
    assert len(origin.requests) == before


@given(
    a=st.integers(0, 10**6),
    n=st.integers(-5, 10**6),
    spaces=st.sampled_from(["", " "]),
)
def test_last_byte_of_a_range_header(a: int, n: int, spaces: str) -> None:
    b = a + n
    header = f"bytes={spaces}{a}{spaces}-{spaces}{b}"
    assert last_byte(header) == (b if b >= a else None)
    assert last_byte(f"bytes={a}-") is None  # open-ended: to the end
    assert last_byte(f"bytes=-{a}") is None  # a suffix
    assert last_byte(f"bytes={a}-{a + 1},{a + 5}-{a + 9}") is None  # several
    assert last_byte(None) is None and last_byte("bytes=x-y") is None


async def test_a_cold_range_over_three_blocks_is_one_discovery_request(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f")
        first, last = B + 40_000, 3 * B + 1000  # blocks 1, 2 and 3
        r = await get(node.port, url, [("range", f"bytes={first}-{last}")])
        assert r.status == 206 and r.body == DATA[first : last + 1]
        await node.cache.wait_idle()
        # one request through the end of block 3, plus block 1's head beside it
        assert sorted(_gets(origin)) == sorted(
            [f"bytes={first}-{4 * B - 1}", f"bytes={B}-{first - 1}"]
        )
        assert origin.body_bytes == 3 * B  # no byte fetched twice
        await _read_back(node, origin, url, B, 4 * B - 1)


async def test_a_discovery_asks_at_most_a_run(origin: Origin, tmp_path: Path) -> None:
    big = os.urandom((run_blocks(B) + 3) * B)
    origin.put("/big", big)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/big")
        r = await get(node.port, url, [("range", f"bytes=0-{len(big) - 1}")])
        assert r.status == 206 and r.body == big
        await node.cache.wait_idle()
        assert _gets(origin)[0] == f"bytes=0-{run_blocks(B) * B - 1}"
        assert origin.body_bytes == len(big)


async def test_the_objects_last_block(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f")
        first = 4 * B + 30_000
        # asked through block 10, past the object's end: a shorter Content-Range
        r = await get(node.port, url, [("range", f"bytes={first}-{10 * B}")])
        assert r.status == 206 and r.body == DATA[first:]
        await node.cache.wait_idle()
        assert sorted(_gets(origin)) == sorted(
            [f"bytes={first}-{11 * B - 1}", f"bytes={4 * B}-{first - 1}"]
        )
        assert origin.body_bytes == B + 1000
        await _read_back(node, origin, url, 4 * B, len(DATA) - 1)


async def test_concurrent_readers_of_overlapping_cold_ranges(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    origin.chunk_size = 4096
    origin.faults["/f"] = Fault(body_delay=0.002)  # a block takes ~30 ms: readers overlap
    spans = [
        (B + 40_000, 3 * B + 10),
        (B + 20_000, 2 * B + 5),
        (2 * B + 100, 4 * B - 1),
        (0, 3 * B),
        (3 * B + 7, len(DATA) - 1),
    ]
    got: dict[tuple[int, int], bytes] = {}
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f")

        async def reader(lo: int, hi: int, delay: float) -> None:
            await trio.sleep(delay)
            r = await get(node.port, url, [("range", f"bytes={lo}-{hi}")])
            assert r.status == 206
            got[(lo, hi)] = r.body

        with trio.fail_after(30):
            async with trio.open_nursery() as readers:
                for i, (lo, hi) in enumerate(spans):
                    readers.start_soon(reader, lo, hi, 0.003 * i)
        for lo, hi in spans:
            assert got[(lo, hi)] == DATA[lo : hi + 1], (lo, hi)
        await node.cache.wait_idle()
        assert origin.body_bytes == len(DATA)  # every byte once: single flight
        await _read_back(node, origin, url, 0, len(DATA) - 1)


async def test_a_rangeless_origin(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    origin.faults["/f"] = Fault(ignore_range=True)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f")
        first, last = B + 40_000, 3 * B + 1000
        r = await get(node.port, url, [("range", f"bytes={first}-{last}")])
        assert r.status == 206 and r.body == DATA[first : last + 1]
        await node.cache.wait_idle()
        # the discovery's answer is the whole object: one request, each byte once
        assert _gets(origin) == [f"bytes={first}-{4 * B - 1}"]
        assert origin.body_bytes == len(DATA)
        await _read_back(node, origin, url, 0, len(DATA) - 1)
