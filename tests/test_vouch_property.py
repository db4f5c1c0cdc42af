"""Fault injection at the upstream boundary (issue 15): whatever framing an origin
uses (Content-Length, chunked, close-delimited) and however it breaks it (cut short,
run long, garbage inside or after the span, bytes after the message), no wrong byte
is ever handed out in a complete read, nor stored.

The origin never lies *inside* a body whose framing checks out: such bytes cannot be
told from the object's own (only a digest could), so they are not a framing fault."""

from __future__ import annotations

import itertools
import os

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mcc
from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged

B = 65536
SIZE = 3 * B - 5000
DATA = os.urandom(SIZE)
ETAG = b'"v1-prop"'
SPAN = f"bytes={B}-{2 * B - 1}".encode()
RIGHT = DATA[B : 2 * B]

_faults = st.one_of(
    st.just(("none", 0, 0)),
    st.tuples(st.just("truncate"), st.integers(0, B - 1), st.just(0)),
    st.tuples(st.just("extend"), st.just(B), st.integers(1, 2 * B)),
    st.tuples(st.just("insert"), st.integers(0, B - 1), st.integers(1, 3000)),
    st.tuples(st.just("trail"), st.just(B), st.integers(1, 3000)),
)


def _garbage(n: int) -> bytes:
    return bytes((i * 131 + 7) & 0xFF for i in range(n))


def _lie(framing: str, fault: tuple[str, int, int], cuts: list[int]) -> Reply:
    """Block 1's answer: the right head (Content-Range for the span asked), a body
    broken by ``fault`` in ``framing``, sent in pieces cut at ``cuts``."""
    kind, at, n = fault
    payload = {
        "none": RIGHT,
        "truncate": RIGHT[:at],
        "extend": RIGHT + _garbage(n),
        "insert": RIGHT[:at] + _garbage(n) + RIGHT[at:],
        "trail": RIGHT,
    }[kind]
    head = b"HTTP/1.1 206 Partial Content\r\ncontent-range: bytes %d-%d/%d\r\netag: %s\r\n" % (
        B,
        2 * B - 1,
        SIZE,
        ETAG,
    )
    bounds = sorted({0, len(payload), *(c % (len(payload) + 1) for c in cuts)})
    pieces = [payload[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    if framing == "length":
        stated = len(RIGHT) if kind in ("truncate", "trail", "none") else len(payload)
        head += b"content-length: %d\r\n\r\n" % stated
    elif framing == "chunked":
        head += b"transfer-encoding: chunked\r\n\r\n"
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces]
        if kind != "truncate":
            pieces.append(b"0\r\n\r\n")
    else:
        head += b"\r\n"  # close-delimited
    if kind == "trail":
        pieces.append(_garbage(n))  # bytes after the message's end
    return Reply([head, *pieces], gap=0.002, close=True)


async def _read(
    cache: mcc.Cache, url: str, a: int, b: int, *, prefix_right: bool = True
) -> bytes | None:
    """The bytes, or None when the read failed (an honest error, the client's response
    cut). Bytes handed out before the error must be right when ``prefix_right``: a
    body not framed by Content-Length vouches for its bytes only at its clean end,
    so a cut response may carry some of a failed one."""
    got = b""
    try:
        async for chunk in cache.read(url, a, b):
            got += chunk
    except mcc.UpstreamError:
        assert not prefix_right or got == DATA[a : a + len(got)]
        return None
    return got


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    framing=st.sampled_from(["length", "chunked", "close"]),
    fault=_faults,
    cuts=st.lists(st.integers(0, 3 * B), max_size=4),
)
async def test_no_wrong_byte_is_handed_out_or_stored(
    tmp_path_factory: pytest.TempPathFactory,
    framing: str,
    fault: tuple[str, int, int],
    cuts: list[int],
) -> None:
    lies = [_lie(framing, fault, cuts)]

    def respond(request: RawRequest) -> Reply:
        if lies and request.headers.get("range") == SPAN:
            return lies.pop()
        return Reply([ranged(request, DATA, [(b"etag", ETAG)])])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with mcc.open_cache(
            cache_dir=tmp_path_factory.mktemp("c"),
            allow_origins=[origin.authority],
            block_size="64KiB",
            readahead_blocks=0,
            limits={"upstream_retries": 1},
        ) as cache:
            url = origin.url("/f")
            with trio.fail_after(20):
                assert await _read(cache, url, 0, 9) == DATA[:10]  # known, block 0 stored
                results: dict[tuple[int, int], bytes | None] = {}

                async def reader(a: int, b: int) -> None:
                    results[(a, b)] = await _read(
                        cache, url, a, b, prefix_right=framing == "length"
                    )

                async with trio.open_nursery() as readers:
                    for a, b in ((B, 2 * B - 1), (B + 100, 2 * B + 500), (SIZE - 1000, SIZE - 1)):
                        readers.start_soon(reader, a, b)
                assert not lies  # the lie was told
                for (a, b), got in results.items():
                    assert got is None or got == DATA[a : b + 1], (a, b)
                await cache.wait_idle()
                assert await _read(cache, url, 0, SIZE - 1) == DATA  # nothing wrong stored
        nursery.cancel_scope.cancel()
