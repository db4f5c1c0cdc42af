"""Hit heads from per-object templates (mcc/http/heads.py): the same fields, in the
same order and case, as the heads h11 builds; h11 clients frame them as usual on
keep-alive connections; and the template path really is the one hits take."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from fixtures.origin import Origin
from mcc.http.heads import _field
from mcc.http.protocol import ServerProtocol
from tests.helpers import Client, run_node

DATA = os.urandom(200_000)
FIELDS = (
    ("cache-control", "max-age=3600"),
    ("content-disposition", 'attachment; filename="cafe.bin"'),
)


async def _raw_head(port: int, target: str, extra: str = "") -> list[bytes]:
    """The head's lines of one GET, as sent (the body is not read)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: mcc.test\r\n{extra}\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
        return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    finally:
        await stream.aclose()


def _varying(line: bytes) -> bool:
    return line.split(b":", 1)[0] in (b"Date", b"Age", b"Connection")


@pytest.mark.parametrize("range_header", ["", "Range: bytes=1000-70000\r\n"])
async def test_template_heads_match_the_heads_h11_builds(
    origin: Origin, tmp_path: Path, range_header: str
) -> None:
    origin.put("/f.bin", DATA, headers=FIELDS)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f.bin")
        await node.cache.warm(url)
        fast = await _raw_head(node.port, url, range_header)  # keep-alive: the template
        slow = await _raw_head(node.port, url, range_header + "Connection: close\r\n")
    assert b"Connection: close" in slow and not any(x.startswith(b"Connection") for x in fast)
    assert [x for x in fast if not _varying(x)] == [x for x in slow if not _varying(x)]
    assert [x.split(b":")[0] for x in fast] == [
        x.split(b":")[0] for x in slow if x != b"Connection: close"
    ]
    assert b'Content-Disposition: attachment; filename="cafe.bin"' in fast
    assert fast[0] == (b"HTTP/1.1 206 Partial Content" if range_header else b"HTTP/1.1 200 OK")


async def test_keep_alive_hits_use_templates_and_frame_correctly(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin.put("/f.bin", DATA, headers=FIELDS)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f.bin")
        await node.cache.warm(url)
        built: list[int] = []
        slow_head = ServerProtocol.response_head

        def counting(self: ServerProtocol, status: int, headers: list[tuple[str, str]]) -> bytes:
            built.append(status)
            return slow_head(self, status, headers)

        monkeypatch.setattr(ServerProtocol, "response_head", counting)
        async with Client.connect(node.port) as c:  # one connection, h11 as the client
            for start, end in [(0, 99), (65530, 65545), (199_000, 199_999)]:
                r = await c.request(url, [("range", f"bytes={start}-{end}")])
                assert r.status == 206 and r.body == DATA[start : end + 1]
                assert r.header("content-range") == f"bytes {start}-{end}/{len(DATA)}"
                assert r.header("cache-status") == "node; hit"
            r = await c.request(url, method="HEAD")
            assert r.status == 200 and r.body == b"" and r.header("content-length") == "200000"
            r = await c.request(url)
            assert r.status == 200 and r.body == DATA
            r = await c.request(url, [("range", "bytes=0-1,5-6")])  # multipart: built by h11
            assert r.status == 206
            assert (r.header("content-type") or "").startswith("multipart/byteranges")
        assert built == [206]  # only the multipart answer went through h11's writer


def test_field_values_h11_would_refuse_are_not_templated() -> None:
    assert _field("etag", '"abc"') == b'ETag: "abc"\r\n'
    assert _field("x-a", "caf\xe9") == b"X-A: caf\xe9\r\n"
    assert _field("x-a", "a\r\nInjected: 1") is None
    assert _field("x-a", "\u0101") is None  # not latin-1
    assert _field("x-a", " padded ") is None  # h11 refuses leading/trailing spaces too
