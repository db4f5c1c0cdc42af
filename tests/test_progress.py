"""The progress guard: a stalled or crawling upstream is left for the next route, and
clients get a right answer or a clean error within about 10 s (issue 15).

Before the guard, a body dripped at 2 bytes/s, or a head followed by silence, kept
every client waiting the whole 30 s read timeout, times three tries."""

from __future__ import annotations

import os
from pathlib import Path

import h11
import pytest
import trio

import mcc
from fixtures.origin import Origin
from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged
from mcc.upstream.progress import Progress, ProgressRules
from tests.helpers import get, run_node

DATA = os.urandom(200_000)
B = 65536


def _split(reply: bytes) -> tuple[bytes, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", body


def _drip(request: RawRequest) -> Reply:
    """The right head, then the body two bytes every second (bounded for the test)."""
    head, body = _split(ranged(request, DATA))
    return Reply([head, *(body[i : i + 1] for i in range(0, 60))], gap=0.5)


def _silent(request: RawRequest) -> Reply:
    """The right head, then silence (longer than any test)."""
    head, body = _split(ranged(request, DATA))
    return Reply([head, body[:0], body[:1]], gap=120)


async def _outcome(port: int, target: str, a: int, b: int) -> str:
    """``right``, ``status NNN`` (an error answer), or ``cut`` (a closed, short
    response); a complete answer with wrong bytes fails the test at once."""
    try:
        r = await get(port, target, [("range", f"bytes={a}-{b}")])
    except (h11.RemoteProtocolError, EOFError, trio.BrokenResourceError):
        return "cut"
    if r.status in (200, 206):
        assert r.body == DATA[a : b + 1], "a complete answer with wrong bytes"
        return "right"
    assert r.status in (502, 503, 504), r.status
    return f"status {r.status}"


async def test_drip_and_stalled_origins_answer_every_client_within_10_s(tmp_path: Path) -> None:
    """With the default guard (no [timeouts] given), clients of a dripping origin and
    of a silent one each end within 10 s (bounded here by a generous 15 s)."""
    async with trio.open_nursery() as nursery:
        drip = RawOrigin(_drip)
        silent = RawOrigin(_silent)
        await nursery.start(drip.serve)
        await nursery.start(silent.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[drip.authority, silent.authority]
        ) as node:
            outcomes: list[str] = []
            silent_outcomes: list[str] = []

            async def client(origin: RawOrigin, a: int, b: int) -> None:
                out = await _outcome(node.port, origin.url("/f"), a, b)
                (silent_outcomes if origin is silent else outcomes).append(out)

            with trio.fail_after(15):
                async with trio.open_nursery() as clients:
                    for origin in (drip, silent):
                        for a, b in ((0, 99), (1000, 70_000), (B, B + 10), (150_000, 199_999)):
                            clients.start_soon(client, origin, a, b)
            assert len(outcomes) == len(silent_outcomes) == 4
            # no byte came from the silent origin: its clients got 504, not a cut
            assert silent_outcomes == ["status 504"] * 4
            # (a short range inside the dripped bytes may be answered right, in time)
            await node.cache.wait_idle()
            index = node.cache.index
            for key in index.object_keys():  # nothing was stored from either
                meta = index.get_object(key)
                assert meta is None or not index.get_blocks(meta.key, meta.version, 0, 10)
        nursery.cancel_scope.cancel()


def _stalling_parent(etag: bytes, last_modified: bytes, *, crawl: bool) -> RawOrigin:
    """A parent that sends the first 10,000 bytes of its answer, then stalls (or
    crawls at 1,000 bytes/s)."""

    def respond(request: RawRequest) -> Reply:
        head, body = _split(
            ranged(request, DATA, [(b"etag", etag), (b"last-modified", last_modified)])
        )
        rest = body[10_000:]
        if crawl:
            return Reply(
                [head + body[:10_000], *(rest[i : i + 100] for i in range(0, 3000, 100))], gap=0.1
            )
        return Reply([head + body[:10_000], rest[:1]], gap=120)

    return RawOrigin(respond)


@pytest.mark.parametrize("crawl", [False, True], ids=["stall", "crawl"])
async def test_a_stalling_parent_is_left_for_the_origin_from_the_byte_reached(
    origin: Origin, tmp_path: Path, crawl: bool
) -> None:
    obj = origin.put("/f", DATA)
    assert obj.etag is not None and obj.last_modified is not None
    async with trio.open_nursery() as nursery:
        parent = _stalling_parent(obj.etag.encode(), obj.last_modified.encode(), crawl=crawl)
        await nursery.start(parent.serve)
        async with run_node(
            tmp_path / "c",
            allow_origins=[origin.authority],
            parents=[f"http://{parent.authority}"],
            readahead_blocks=0,
            limits={"upstream_retries": 0},  # leaving a stalled route spends no retry
            timeouts={"stall": 0.5, "min_rate": 4000, "min_rate_window": 1.0},
        ) as node:
            with trio.fail_after(15):
                r = await get(node.port, origin.url("/f"), [("range", f"bytes=0-{B - 1}")])
            assert r.status == 206 and r.body == DATA[:B]
            assert len(parent.requests) == 1
            asked = [rq for rq in origin.requests if rq.method == "GET"]
            assert len(asked) == 1  # resumed on the origin, where the parent stopped
            start = int(asked[0].headers["range"].split("=")[1].split("-")[0])
            assert 10_000 <= start < B
            assert asked[0].headers.get("if-range") == obj.etag
        nursery.cancel_scope.cancel()


async def test_a_parent_silent_before_its_head_is_left_for_the_origin(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    async with trio.open_nursery() as nursery:
        parent = RawOrigin(lambda rq: Reply([b"", b"HTTP/1.1 500 Late\r\n\r\n"], gap=120))
        await nursery.start(parent.serve)
        async with run_node(
            tmp_path / "c",
            allow_origins=[origin.authority],
            parents=[f"http://{parent.authority}"],
            readahead_blocks=0,
            limits={"upstream_retries": 0},
            timeouts={"stall": 0.5},
        ) as node:
            with trio.fail_after(15):
                r = await get(node.port, origin.url("/f"), [("range", "bytes=100-199")])
            assert r.status == 206 and r.body == DATA[100:200]
            assert len(parent.requests) == 1 and origin.count("/f") == 1
        nursery.cancel_scope.cancel()


def test_progress_stall_deadline_and_rate_floor() -> None:
    rules = ProgressRules(stall=5.0, min_rate=4000, window=8.0)
    p = Progress(rules, now=100.0)
    assert p.deadline() == 105.0
    assert p.received(1000, 101.0) is None
    assert p.deadline() == 106.0  # a byte moves the deadline
    assert p.received(0, 107.9) is None  # the window is not over yet
    assert p.received(31_000, 108.0) is None  # 32,000 bytes in 8 s: exactly the floor
    assert p.received(10, 116.0) is not None  # a new window: 10 bytes in 8 s
    off = Progress(ProgressRules(stall=5.0, min_rate=0, window=1.0), now=0.0)
    assert off.received(0, 50.0) is None  # min_rate 0: no floor


def test_guard_knobs_are_checked() -> None:
    config = mcc.load_config(overrides={"timeouts": {"min_rate": 0, "stall": "2s"}})
    assert config.timeouts.min_rate == 0 and config.timeouts.stall == 2.0
    with pytest.raises(mcc.ConfigError) as bad:
        mcc.load_config(overrides={"timeouts": {"min_rate": -1, "stall": 0, "pool_idle": 0}})
    assert sorted(bad.value.problems) == [
        "timeouts.min_rate: -1 must not be negative",
        "timeouts.pool_idle: 0.0 must be more than zero",
        "timeouts.stall: 0.0 must be more than zero",
    ]
