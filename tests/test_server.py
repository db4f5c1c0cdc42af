"""The HTTP front end over real sockets, against the real test origin."""

from __future__ import annotations

import contextlib
import email.parser
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio

from fixtures.origin import Origin
from tests.helpers import Client, Node, get, raw_exchange, run_node

DATA = random.Random(7).randbytes(700_000)


@pytest.fixture
async def node(origin: Origin, tmp_path: Path) -> AsyncIterator[Node]:
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as n:
        yield n


def _ranges(rng: random.Random, size: int, n: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        a = rng.randrange(size)
        out.append((a, rng.randrange(a, min(size, a + 300_000))))
    return out


async def test_four_routing_forms_serve_the_origin_bytes(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    rng = random.Random(1)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], origin=origin.url("")
    ) as node:
        forms = {
            "do": (f"/f.bin?cacheHostOrigin={origin.authority}", "mcc.test"),
            "proxy": (origin.url("/f.bin"), "ignored.example"),
            "host": ("/f.bin", origin.authority),
            "origin": ("/f.bin", node.authority),
        }
        async with Client.connect(node.port) as c:
            for form, (target, host) in forms.items():
                r = await c.request(target, host=host)
                assert r.status == 200, (form, r.body)
                assert r.body == DATA, form
                for a, b in _ranges(rng, len(DATA), 6):
                    r = await c.request(target, [("range", f"bytes={a}-{b}")], host=host)
                    assert r.status == 206, form
                    assert r.body == DATA[a : b + 1], (form, a, b)
                    assert r.header("content-range") == f"bytes {a}-{b}/{len(DATA)}"
        # the DO form removes its parameter and keeps the rest of the query
        r = await get(node.port, f"/f.bin?x=1&cacheHostOrigin={origin.authority}&y=2")
        assert r.body == DATA
        assert origin.requests[-1].target == "/f.bin?x=1&y=2"
    # the four forms share one cache entry: one discovery, then only block fetches
    assert sum(1 for r in origin.requests if r.headers.get("if-range") is None) == 2, [
        (r.method, r.target, r.headers.get("range")) for r in origin.requests
    ]


async def test_hit_headers_and_cache_status(node: Node, origin: Origin) -> None:
    target = origin.url("/f.bin")
    first = await get(node.port, target, [("range", "bytes=0-99")])
    assert first.header("cache-status") == "node; fwd=miss; stored"
    await node.cache.wait_idle()
    again = await get(node.port, target, [("range", "bytes=0-99")])
    assert again.header("cache-status") == "node; hit"
    assert again.header("accept-ranges") == "bytes"
    assert again.header("etag") == origin.objects["/f.bin"].etag
    assert again.header("last-modified") == origin.objects["/f.bin"].last_modified
    assert again.header("content-type") == "application/octet-stream"
    assert again.header("age") is not None and int(again.header("age") or "x") >= 0
    assert again.body == DATA[:100]


async def test_head_has_length_and_no_body(node: Node, origin: Origin) -> None:
    r = await get(node.port, origin.url("/f.bin"), method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header("content-length") == str(len(DATA))


async def test_refusals(node: Node, origin: Origin) -> None:
    r = await get(node.port, "http://evil.example/x")
    assert r.status == 403 and b"evil.example" in r.body and r.body.count(b"\n") == 1
    r = await get(node.port, "/x?cacheHostOrigin=evil.example")
    assert r.status == 403
    r = await get(node.port, "/some/path", host=node.authority)  # names no origin
    assert r.status == 400
    r = await get(node.port, "/some/path", host="localhost")
    assert r.status == 400
    r = await get(node.port, "/health", host=node.authority)
    assert r.status == 204
    r = await get(node.port, origin.url("/f.bin"), method="CONNECT")
    assert r.status == 405
    r = await get(node.port, origin.url("/f.bin"), [("via", "1.1 other, 1.1 node")])
    assert r.status == 508
    r = await get(node.port, origin.url("/f.bin"), [("range", f"bytes={len(DATA)}-")])
    assert r.status == 416 and r.header("content-range") == f"bytes */{len(DATA)}"
    r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=999999999-")])
    assert r.status == 416
    r = await get(node.port, origin.url("/missing"))
    assert r.status == 404  # upstream's own answer, passed through


async def test_oversized_head_gets_431(node: Node, origin: Origin) -> None:
    req = f"GET {origin.url('/f.bin')} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20000}\r\n\r\n"
    out = await raw_exchange(node.port, req.encode())
    assert out.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    ],
)
async def test_malformed_and_smuggling_shapes_get_400_and_close(node: Node, raw: bytes) -> None:
    out = await raw_exchange(node.port, raw)
    assert out.startswith(b"HTTP/1.1 400 "), out[:100]
    assert b"connection: close" in out.lower()


async def test_multipart_byteranges_parse_with_a_mime_parser(node: Node, origin: Origin) -> None:
    spans = [(0, 9), (5, 20), (100_000, 100_099), (650_000, 699_999)]  # first two overlap
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in spans)
    r = await get(node.port, origin.url("/f.bin"), [("range", header)])
    assert r.status == 206
    ctype = r.header("content-type") or ""
    assert ctype.startswith("multipart/byteranges; boundary=")
    msg = email.parser.BytesParser().parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + r.body)
    assert msg.is_multipart()
    parts = msg.get_payload()
    assert isinstance(parts, list)
    merged = [(0, 20), (100_000, 100_099), (650_000, 699_999)]
    assert len(parts) == len(merged)
    for part, (a, b) in zip(parts, merged, strict=True):
        assert part["content-range"] == f"bytes {a}-{b}/{len(DATA)}"
        assert part.get_payload(decode=True) == DATA[a : b + 1]


async def test_too_many_ranges_get_the_whole_object(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"max_ranges": 3}
    ) as node:
        header = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(4))
        r = await get(node.port, origin.url("/f.bin"), [("range", header)])
        assert r.status == 200 and r.body == DATA


async def test_invalid_range_is_ignored_and_if_range(node: Node, origin: Origin) -> None:
    r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=5-1")])
    assert r.status == 200 and len(r.body) == len(DATA)
    etag = origin.objects["/f.bin"].etag or ""
    r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=-10"), ("if-range", etag)])
    assert r.status == 206 and r.body == DATA[-10:]
    r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=-10"), ("if-range", '"old"')])
    assert r.status == 200 and r.body == DATA
    lm = origin.objects["/f.bin"].last_modified or ""
    r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=0-0"), ("if-range", lm)])
    assert r.status == 206 and r.body == DATA[:1]


async def test_keepalive_and_pipelining_answer_in_order(node: Node, origin: Origin) -> None:
    spans = [(0, 9), (100, 199), (600_000, 600_010), (5, 5)]
    raw = b"".join(
        f"GET {origin.url('/f.bin')} HTTP/1.1\r\nHost: x\r\nRange: bytes={a}-{b}\r\n\r\n".encode()
        for a, b in spans
    )
    async with Client.connect(node.port) as c:
        await c.stream.send_all(raw)
        buffered = b""
        for i, (a, b) in enumerate(spans):
            parser = h11.Connection(h11.CLIENT)  # one parser per pipelined response
            parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            parser.send(h11.EndOfMessage())
            if buffered:
                parser.receive_data(buffered)
            status, body = 0, b""
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(bytes(await c.stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            buffered = parser.trailing_data[0]
            assert status == 206 and body == DATA[a : b + 1], i
        # the same connection still serves a plain request afterwards
        c.conn = h11.Connection(h11.CLIENT)
        r = await c.request(origin.url("/f.bin"))
        assert r.body == DATA


async def test_http10_gets_a_whole_answer_and_close(node: Node, origin: Origin) -> None:
    out = await raw_exchange(node.port, f"GET {origin.url('/f.bin')} HTTP/1.0\r\n\r\n".encode())
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == DATA


async def test_slowloris_is_dropped_while_others_are_served(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], timeouts={"request_head": 0.5}
    ) as node:
        slow = await trio.open_tcp_stream("127.0.0.1", node.port)
        await slow.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = trio.current_time()
        for _ in range(3):
            r = await get(node.port, origin.url("/f.bin"), [("range", "bytes=0-9")])
            assert r.status == 206
        # dropped: the server closes (or resets) the dribbling connection in time
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            while await slow.receive_some(1024):
                await slow.send_all(b"X-Drip: 1\r\n")
        assert trio.current_time() - started < 3
        await slow.aclose()


async def test_post_is_forwarded_and_invalidates(node: Node, origin: Origin) -> None:
    target = origin.url("/f.bin")
    await get(node.port, target, [("range", "bytes=0-9")])
    await node.cache.wait_idle()
    assert node.cache.index.get_object(node.cache.resolve(target)) is not None
    r = await get(node.port, target, method="POST", body=b"hello")
    assert r.status == 200 and r.body == b"echo:hello"
    assert r.header("cache-status") == "node; fwd=uri-miss"
    assert node.cache.index.get_object(node.cache.resolve(target)) is None


async def test_credentials_and_no_store_are_not_stored(node: Node, origin: Origin) -> None:
    origin.put("/private.bin", b"secret" * 100, headers=(("cache-control", "private"),))
    r = await get(node.port, origin.url("/private.bin"))
    assert r.status == 200 and r.body == b"secret" * 100
    assert r.header("cache-status") == "node; fwd=uri-miss"
    r = await get(node.port, origin.url("/f.bin"), [("authorization", "Bearer x")])
    assert r.status == 200 and r.body == DATA
    await node.cache.wait_idle()
    assert node.cache.index.object_keys() == []
    assert origin.requests[-1].headers.get("authorization") == "Bearer x"


async def test_via_is_added_upstream(node: Node, origin: Origin) -> None:
    await get(node.port, origin.url("/f.bin"), [("range", "bytes=0-0"), ("via", "1.1 child")])
    assert origin.requests[-1].headers.get("via") == "1.1 child, 1.1 node"


async def test_too_many_connections_get_503(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"max_connections": 2}
    ) as node:
        held = [await trio.open_tcp_stream("127.0.0.1", node.port) for _ in range(2)]
        await trio.sleep(0.05)
        out = await raw_exchange(node.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        for s in held:
            await s.aclose()


async def test_large_cold_and_warm_whole_file(origin: Origin, tmp_path: Path) -> None:
    big = os.urandom(5 * 1024 * 1024 + 123)
    origin.put("/big.bin", big)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], block_size="1MiB"
    ) as node:
        r = await get(node.port, origin.url("/big.bin"))
        assert r.body == big
        await node.cache.wait_idle()
        r = await get(node.port, origin.url("/big.bin"))
        assert r.body == big and r.header("cache-status") == "node; hit"


async def test_ipv6_listener(origin: Origin, tmp_path: Path) -> None:
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    origin.put("/f.bin", DATA)
    try:
        ctx = run_node(tmp_path / "c", allow_origins=[origin.authority], listen=["[::1]:0"])
        node = await ctx.__aenter__()
    except OSError as exc:
        pytest.skip(f"cannot listen on [::1]: {exc}")
    try:
        stream = await trio.open_tcp_stream("::1", node.port)
        request = f"GET {origin.url('/f.bin')} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
        await stream.send_all(request.encode())
        out = b""
        while not out.endswith(DATA[:10]):
            chunk = await stream.receive_some(65536)
            assert chunk
            out += chunk
        assert out.startswith(b"HTTP/1.1 206 ")
        await stream.aclose()
    finally:
        await ctx.__aexit__(None, None, None)


async def test_a_client_reading_too_slowly_is_dropped(origin: Origin, tmp_path: Path) -> None:
    big = os.urandom(16 * 1024 * 1024)
    origin.put("/big.bin", big)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], timeouts={"send": 0.3}
    ) as node:
        await node.cache.warm(origin.url("/big.bin"))
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        # a small receive buffer, so the server's sends block while we do not read
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = f"GET {origin.url('/big.bin')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        await stream.send_all(request)
        await trio.sleep(2)  # stall far longer than the send timeout
        got = 0
        with trio.fail_after(10), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(1 << 20):
                got += len(chunk)
        assert got < len(big)  # cut off: the connection closed before the body ended
        await stream.aclose()
