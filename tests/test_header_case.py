"""Header names leave mcc in canonical case, on every kind of response.

Regression: mcc sent ``content-length`` / ``content-range`` in lower case, and the
Delivery Optimization agent, which looks those two names up case-sensitively, could not
resume a download (``Range: bytes=N-``). nginx, IIS and CDNs send canonical case.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import trio

from fixtures.origin import Fault, Origin
from mcc.headers import canonical_name
from tests.helpers import free_port, run_node

DATA = random.Random(11).randbytes(300_000)

_TITLE = re.compile(r"^[A-Z][a-z0-9]*(-[A-Z][a-z0-9]*)*$")
_SPECIAL = {"ETag", "WWW-Authenticate"}


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and {exact name: value} of the first response head in ``raw``."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    names: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        names[name] = value.strip()
    return status, names


def _assert_canonical(names: dict[str, str], *required: str) -> None:
    for name in names:
        assert _TITLE.match(name) or name in _SPECIAL, f"{name!r} is not in canonical case"
        assert name == canonical_name(name)
    for name in ("Date", "Server", *required):
        assert name in names, f"{name} missing (sent: {sorted(names)})"


async def _exchange(port: int, data: bytes) -> bytes:
    """Send one request; read one response (head and Content-Length body) and close,
    without waiting for the server to close (it lingers after errors)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    raw = b""
    try:
        await stream.send_all(data)
        with trio.fail_after(10):
            while b"\r\n\r\n" not in raw:
                chunk = await stream.receive_some(65536)
                assert chunk, raw
                raw += chunk
            _, names = _head(raw)
            length = int(names.get("Content-Length", "0"))
            while len(raw.partition(b"\r\n\r\n")[2]) < length:
                chunk = await stream.receive_some(65536)
                assert chunk, raw[:300]
                raw += chunk
    finally:
        await stream.aclose()
    return raw


def _get(target: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: mcc.test", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_canonical_name_table() -> None:
    assert canonical_name("content-length") == "Content-Length"
    assert canonical_name("CONTENT-RANGE") == "Content-Range"
    assert canonical_name("etag") == "ETag"
    assert canonical_name("www-authenticate") == "WWW-Authenticate"
    assert canonical_name("cache-status") == "Cache-Status"
    assert canonical_name("x-amz-request-id") == "X-Amz-Request-Id"


async def test_every_kind_of_response_has_canonical_names(origin: Origin, tmp_path: Path) -> None:
    origin.put(
        "/f.bin",
        DATA,
        headers=(("cache-control", "max-age=3600"), ("content-disposition", "attachment")),
    )
    origin.put("/auth", b"secret", headers=(("www-authenticate", 'Basic realm="x"'),))
    target = origin.url("/f.bin")
    dead = f"127.0.0.1:{free_port()}"
    async with run_node(tmp_path / "c", allow_origins=[origin.authority, dead]) as node:
        # miss
        status, names = _head(await _exchange(node.port, _get(target)))
        assert status == 200
        _assert_canonical(
            names,
            "Content-Length",
            "Content-Type",
            "ETag",
            "Last-Modified",
            "Accept-Ranges",
            "Cache-Status",
            "Age",
            "Cache-Control",
            "Content-Disposition",
        )
        assert names["Cache-Status"] == "node; fwd=miss; stored"
        await node.cache.wait_idle()
        # hit, a range of it
        raw = await _exchange(node.port, _get(target, "Range: bytes=100-"))
        status, names = _head(raw)
        assert status == 206
        _assert_canonical(names, "Content-Length", "Content-Range", "ETag", "Cache-Status")
        assert names["Cache-Status"] == "node; hit"
        assert names["Content-Range"] == f"bytes 100-{len(DATA) - 1}/{len(DATA)}"
        assert raw.endswith(DATA[100:])
        # multipart: the part heads too
        raw = await _exchange(node.port, _get(target, "Range: bytes=0-1,10-11"))
        status, names = _head(raw)
        assert status == 206
        _assert_canonical(names, "Content-Length", "Content-Type")
        assert raw.count(b"\r\nContent-Range: bytes ") == 2
        # 416
        status, names = _head(await _exchange(node.port, _get(target, "Range: bytes=9999999-")))
        assert status == 416
        _assert_canonical(names, "Content-Range", "Content-Length")
        # pass-through (an unsafe method), with a WWW-Authenticate forwarded
        status, names = _head(await _exchange(node.port, _get(target, method="POST", body=b"x")))
        assert status == 200
        _assert_canonical(names, "Content-Length", "Cache-Status")
        status, names = _head(
            await _exchange(node.port, _get(origin.url("/auth"), "Authorization: Basic eA=="))
        )
        assert status == 200
        _assert_canonical(names, "WWW-Authenticate", "Cache-Status")
        assert names["Cache-Status"] == "node; fwd=uri-miss"
        # 4xx from mcc: a host not allowed, a malformed request
        status, names = _head(await _exchange(node.port, _get("http://evil.example/x")))
        assert status == 403
        _assert_canonical(names, "Content-Length", "Content-Type", "Connection")
        status, names = _head(await _exchange(node.port, b"GET / HTTP/1.1\r\nHost: \r\n\r\n"))
        assert 400 <= status < 500
        _assert_canonical(names, "Content-Length")
        # 5xx from mcc: the origin is down
        status, names = _head(await _exchange(node.port, _get(f"http://{dead}/x")))
        assert status == 502
        _assert_canonical(names, "Content-Length", "Content-Type")
        # 5xx passed through from the origin
        origin.put("/boom", b"")
        origin.faults["/boom"] = Fault(status=500)
        status, names = _head(await _exchange(node.port, _get(origin.url("/boom"))))
        assert status == 500
        _assert_canonical(names, "Content-Length", "Content-Type")
        # the admin API
        for path in ("/metrics", "/summary", "/health", "/nope"):
            status, names = _head(await _exchange(node.admin_port, _get(path)))
            _assert_canonical(names, "Content-Length", "Content-Type")


async def test_a_case_sensitive_client_pauses_and_resumes(origin: Origin, tmp_path: Path) -> None:
    """Download part of an object, close (pause), resume with ``Range: bytes=N-``;
    the client finds its lengths under exact-case names only."""
    origin.put("/filestreamingservice/files/abc", DATA)
    target = f"/filestreamingservice/files/abc?cacheHostOrigin={origin.authority}"
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        # first session: read the head and about a third of the body, then hang up
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        await stream.send_all(_get(target).replace(b"Connection: close\r\n", b""))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        status, names = _head(buf)
        assert status == 200
        total = int(names["Content-Length"])  # KeyError if not in exact case
        got = buf.partition(b"\r\n\r\n")[2]
        while len(got) < total // 3:
            got += await stream.receive_some(65536)
        await stream.aclose()
        assert total == len(DATA) and got == DATA[: len(got)]
        # second session: resume where it stopped
        raw = await _exchange(node.port, _get(target, f"Range: bytes={len(got)}-"))
        status, names = _head(raw)
        assert status == 206
        first, _, size = names["Content-Range"].removeprefix("bytes ").partition("/")
        assert int(first.split("-")[0]) == len(got) and int(size) == total
        rest = raw.partition(b"\r\n\r\n")[2]
        assert len(rest) == int(names["Content-Length"])
        assert got + rest == DATA
