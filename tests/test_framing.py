"""The four framing lies of issue 15, each answered once to the fetch of block 1 of a
3 MiB object (block size 1 MiB, a strong ETag) while other clients read a range of
block 2 and a suffix: no complete answer carries a wrong byte, and afterwards every
range of the object reads back right.

What used to break: the body of a 206 was checked only against the object's end, so
bytes past the span became the start of the next block, joined by its readers and
stored (6 complete wrong answers and 11 poisoned re-reads over the four shapes)."""

from __future__ import annotations

import os
from pathlib import Path

import h11
import pytest
import trio

from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged
from tests.helpers import get, run_node

MiB = 1024 * 1024
DATA = os.urandom(3 * MiB)
ETAG = b'"v1-framing"'
SPAN = b"bytes=1048576-2097151"
RIGHT = DATA[MiB : 2 * MiB]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _head(framing: bytes) -> bytes:
    return (
        b"HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 1048576-2097151/3145728\r\n"
        b"etag: " + ETAG + b"\r\n" + framing + b"\r\n\r\n"
    )


CHUNKED = b"transfer-encoding: chunked"
SHAPES = {
    # a chunked 206 with the right 1 MiB, then 1 MiB of garbage, then a clean end
    "chunked+1MiB": Reply(
        [
            _head(CHUNKED),
            _chunk(RIGHT[:500_000]),
            _chunk(RIGHT[500_000:]),
            _chunk(os.urandom(MiB)),
            b"0\r\n\r\n",
        ],
        gap=0.05,
    ),
    # the same with 1,000 garbage bytes
    "chunked+1000": Reply(
        [_head(CHUNKED), _chunk(RIGHT), _chunk(os.urandom(1000)), b"0\r\n\r\n"], gap=0.05
    ),
    # Content-Length the span plus 64 KiB, garbage after the right bytes
    "length+64KiB": Reply(
        [_head(b"content-length: %d" % (MiB + 65536)), RIGHT, os.urandom(65536)], gap=0.05
    ),
    # chunked, the right 1 MiB, then garbage until the connection drops
    "chunked+drop": Reply(
        [_head(CHUNKED), _chunk(RIGHT)] + [_chunk(os.urandom(256 * 1024)) for _ in range(6)],
        gap=0.05,
        close=True,
    ),
    # (beyond the four) 1,000 garbage bytes inside the span: the body runs
    # long only at its end, after its readers had every byte of the span; they finish
    # only once the body ended cleanly, so here they are cut
    "chunked-inside": Reply(
        [
            _head(CHUNKED),
            _chunk(RIGHT[:500_000]),
            _chunk(os.urandom(1000)),
            _chunk(RIGHT[500_000:]),
            b"0\r\n\r\n",
        ],
        gap=0.05,
    ),
}


async def _outcome(port: int, target: str, spec: str) -> str:
    """``right``, ``cut`` or an error status; a complete wrong answer fails here."""
    try:
        r = await get(port, target, [("range", spec)])
    except (h11.RemoteProtocolError, EOFError, trio.BrokenResourceError):
        return "cut"
    if r.status == 206:
        content_range = r.header("content-range") or ""
        first, last = (int(x) for x in content_range.split()[1].split("/")[0].split("-"))
        assert r.body == DATA[first : last + 1], f"a complete wrong answer to {spec}"
        return "right"
    assert 500 <= r.status < 600, r.status
    return str(r.status)


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_framing_lie_never_gives_a_wrong_answer_or_poisons(
    tmp_path: Path, shape: str
) -> None:
    lies = [SHAPES[shape]]

    def respond(request: RawRequest) -> Reply:
        if lies and request.headers.get("range") == SPAN:
            return lies.pop()
        return Reply([ranged(request, DATA, [(b"etag", ETAG)])])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c",
            allow_origins=[origin.authority],
            block_size="1MiB",
            limits={"upstream_retries": 1},
        ) as node:
            url = origin.url("/f")
            outcomes: dict[str, str] = {}

            async def client(spec: str, delay: float) -> None:
                await trio.sleep(delay)
                outcomes[spec] = await _outcome(node.port, url, spec)

            with trio.fail_after(30):
                async with trio.open_nursery() as clients:
                    clients.start_soon(client, "bytes=1048576-2097151", 0)  # meets the lie
                    clients.start_soon(client, "bytes=2200000-2300000", 0.02)  # block 2
                    clients.start_soon(client, "bytes=-100000", 0.02)  # a suffix
                assert not lies  # the lie was told
                await node.cache.wait_idle()
                # the origin is honest now: every range reads back right
                for spec in (
                    "bytes=0-",
                    "bytes=1048576-2097151",
                    "bytes=2097152-3145727",
                    "bytes=1048000-2098000",
                    "bytes=-100000",
                    "bytes=2200000-2300000",
                ):
                    assert await _outcome(node.port, url, spec) == "right", spec
        nursery.cancel_scope.cancel()
