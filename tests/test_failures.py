"""Each broken-upstream shape ends in an error or correct bytes, never wrong bytes,
and never a partially stored block (a fault-injecting origin on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import h11
import pytest
import trio

import mcc
from fixtures.origin import Fault, Origin
from tests.helpers import free_port, get, run_node

DATA = os.urandom(300_000)
B = 65536


async def _collect(cache: mcc.Cache, url: str, a: int, b: int) -> bytes:
    return b"".join([c async for c in cache.read(url, a, b)])


def _stored(cache: mcc.Cache, url: str) -> dict[int, str]:
    meta = cache.index.get_object(cache.resolve(url))
    return {} if meta is None else cache.index.get_blocks(meta.key, meta.version, 0, 100)


@pytest.mark.parametrize(
    "fault",
    [
        Fault(reset_after=10_000),  # reset mid-body
        Fault(short_by=1000),  # fewer bytes than Content-Length, then close
        Fault(wrong_content_range=True),  # a 206 for other bytes than asked
        Fault(status=503),  # a 5xx for a block
        Fault(head_delay=2.0),  # slower than the read timeout
        Fault(body_delay=2.0),  # a body that stalls past the read timeout
    ],
    ids=["reset", "short", "wrong-range", "5xx", "slow-head", "slow-body"],
)
async def test_block_fetch_failures_give_errors_and_store_nothing(
    origin: Origin, tmp_path: Path, fault: Fault
) -> None:
    origin.put("/f", DATA)
    async with mcc.open_cache(
        cache_dir=tmp_path,
        allow_origins=[origin.authority],
        block_size="64KiB",
        readahead_blocks=0,
        limits={"upstream_retries": 1},
        timeouts={"read": 0.3},
    ) as cache:
        url = origin.url("/f")
        assert await _collect(cache, url, 0, 0) == DATA[:1]  # block 0 stored, healthy
        await cache.wait_idle()
        origin.faults["/f"] = fault
        got = b""
        with pytest.raises(mcc.UpstreamError):
            async for chunk in cache.read(url, B, 2 * B - 1):
                got += chunk
        assert got == DATA[B : B + len(got)]  # what came before the error was right
        await cache.wait_idle()
        assert list(_stored(cache, url)) == [0]  # nothing partial was stored
        del origin.faults["/f"]
        assert await _collect(cache, url, B, 2 * B - 1) == DATA[B : 2 * B]


async def test_transient_failure_is_retried_transparently(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    async with mcc.open_cache(
        cache_dir=tmp_path, allow_origins=[origin.authority], block_size="64KiB"
    ) as cache:
        url = origin.url("/f")
        await _collect(cache, url, 0, 0)
        for fault in (
            Fault(status=503, fail_times=1),
            Fault(short_by=10, fail_times=1),
            Fault(wrong_content_range=True, fail_times=1),
        ):
            origin.faults["/f"] = fault
            idx = 1 + len(_stored(cache, url))
            await cache.wait_idle()
            assert (
                await _collect(cache, url, idx * B, idx * B + 99) == DATA[idx * B : idx * B + 100]
            )


async def test_connection_refused_is_a_502(tmp_path: Path) -> None:
    port = free_port()
    async with run_node(
        tmp_path / "c", allow_origins=[f"127.0.0.1:{port}"], limits={"upstream_retries": 1}
    ) as node:
        r = await get(node.port, f"http://127.0.0.1:{port}/x")
        assert r.status == 502 and b"connection failed" in r.body


async def test_slow_origin_times_out_with_504_for_every_waiter(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/slow", DATA)
    origin.faults["/slow"] = Fault(head_delay=3.0)
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        limits={"upstream_retries": 0},
        timeouts={"read": 0.3},
    ) as node:
        statuses: list[int] = []

        async def client() -> None:
            statuses.append((await get(node.port, origin.url("/slow"))).status)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(client)
        assert statuses == [504] * 5
        assert node.cache.index.object_keys() == []


async def test_cold_miss_broken_mid_body_closes_the_client_connection(
    origin: Origin, tmp_path: Path
) -> None:
    """Once a 200 head has gone out, the only honest signal is a short, closed response."""
    origin.put("/f", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"upstream_retries": 0}
    ) as node:
        await get(node.port, origin.url("/f"), [("range", "bytes=0-0")])
        await node.cache.wait_idle()
        origin.faults["/f"] = Fault(reset_after=5000)
        with pytest.raises(h11.RemoteProtocolError, match="without sending complete"):
            await get(node.port, origin.url("/f"))
