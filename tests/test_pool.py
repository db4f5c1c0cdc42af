"""Upstream pool hygiene (issue 15): misses after an origin dropped its idle
keep-alive connections all succeed, idle connections past ``timeouts.pool_idle`` are
not reused, and an answer that ends its connection is never followed by another
request on it.

What used to break: an origin closing idle connections after 1 s (nginx
``keepalive_timeout 1s``) made misses 2.5 s apart fail now and then with 502; and a
Content-Length body read past h11 forgot ``Connection: close`` and HTTP/1.0, so the
connection went back to the pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged
from tests.helpers import get, run_node

DATA = os.urandom(100_000)


@pytest.mark.parametrize(
    "pool_idle", [60.0, 0.3], ids=["retried-on-a-fresh-connection", "closed-by-age"]
)
async def test_misses_after_the_origin_dropped_idle_connections_all_succeed(
    tmp_path: Path, pool_idle: float
) -> None:
    async with trio.open_nursery() as nursery:
        origin = RawOrigin(lambda rq: Reply([ranged(rq, DATA)]), drop_idle_after=0.5)
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c",
            allow_origins=[origin.authority],
            readahead_blocks=0,
            limits={"upstream_retries": 0},  # only the pool may save a request
            timeouts={"pool_idle": pool_idle},
        ) as node:
            for i in range(4):
                if i:
                    await trio.sleep(0.7)  # longer than the origin keeps idle connections
                r = await get(node.port, origin.url(f"/f{i}"), [("range", "bytes=10-99")])
                assert r.status == 206 and r.body == DATA[10:100], (i, r.status, r.body[:200])
            if pool_idle > 0.7:
                assert origin.dropped >= 1  # the race happened, and was retried
            else:
                assert origin.dropped == 0  # no connection was old enough to be dropped
        nursery.cancel_scope.cancel()


async def test_idle_connections_within_pool_idle_are_reused(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        origin = RawOrigin(lambda rq: Reply([ranged(rq, DATA)]))
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[origin.authority], readahead_blocks=0
        ) as node:
            for i in range(3):
                r = await get(node.port, origin.url(f"/f{i}"), [("range", "bytes=0-9")])
                assert r.status == 206 and r.body == DATA[:10]
                await node.cache.wait_idle()  # the block's fetch is over
            assert {rq.connection for rq in origin.requests} == {0}
        nursery.cancel_scope.cancel()


def _closing(how: str) -> RawOrigin:
    def respond(request: RawRequest) -> Reply:
        reply = ranged(request, DATA)
        if how == "http/1.0":
            reply = b"HTTP/1.0" + reply[len(b"HTTP/1.1") :]
        else:
            reply = reply.replace(b"\r\n", b"\r\nconnection: close\r\n", 1)
        return Reply([reply])  # ... and keeps the connection open all the same

    return RawOrigin(respond)


@pytest.mark.parametrize("how", ["connection-close", "http/1.0"])
async def test_an_answer_that_ends_its_connection_is_not_followed_on_it(
    tmp_path: Path, how: str
) -> None:
    async with trio.open_nursery() as nursery:
        origin = _closing(how)
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[origin.authority], readahead_blocks=0
        ) as node:
            for i in range(3):
                r = await get(node.port, origin.url(f"/f{i}"), [("range", "bytes=0-9")])
                assert r.status == 206 and r.body == DATA[:10]
                await node.cache.wait_idle()
            connections = [rq.connection for rq in origin.requests]
            assert len(set(connections)) == len(connections) == 3
        nursery.cancel_scope.cancel()
