"""No request can kill the node: odd bytes from clients and origins, bugs in one fill.

Each test reproduces a request that once ended the process (or cut every later
request for an object), and shows the node still answering afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mcc
from fixtures.origin import Origin
from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged, response
from mcc.http.protocol import MAX_TARGET
from tests.helpers import Node, get, raw_exchange, run_node

DATA = os.urandom(100_000)


async def _healthy(node: Node) -> None:
    """The node still answers a request."""
    r = await get(node.port, "/health", host=node.authority)
    assert r.status == 204


async def _serve_raw(nursery: trio.Nursery, respond: Any) -> RawOrigin:
    origin = RawOrigin(respond)
    await nursery.start(origin.serve)
    return origin


def _raw_get(node: Node, target: str, extra: bytes = b"") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nhost: mcc.test\r\n".encode("latin-1")
        + extra
        + b"connection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    "host",
    [
        ".windowsupdate.com",  # an empty label matching *.windowsupdate.com
        "a..windowsupdate.com",
        "x" * 64 + ".windowsupdate.com",  # a label over 63 characters
        ("a" * 60 + ".") * 5 + "windowsupdate.com",  # a name over 253 characters
    ],
)
async def test_hosts_that_cannot_be_names_get_400(tmp_path: Path, host: str) -> None:
    # the embedded default allowlist, which has *.windowsupdate.com
    async with run_node(tmp_path / "c", allow_origins=mcc.Config().allow_origins) as node:
        r = await get(node.port, f"/x?cacheHostOrigin={host}")
        assert r.status == 400, r.body
        await _healthy(node)


async def test_obs_text_in_a_request_header_is_forwarded_as_bytes(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], block_size="64KiB"
    ) as node:
        # a miss, then a partial hit, each carrying a Via with byte 0xff
        for rng in (b"bytes=0-99", b"bytes=0-99999"):
            out = await raw_exchange(
                node.port,
                _raw_get(node, origin.url("/f"), b"via: 1.1 \xff\r\nrange: " + rng + b"\r\n"),
            )
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 206"), head
            last = int(rng.split(b"-")[1])
            assert body == DATA[: last + 1]
        assert any(b"\xff" in r.headers.get("via", "").encode("latin-1") for r in origin.requests)
        # a pass-through (POST) with an obs-text header reaches the origin too
        out = await raw_exchange(
            node.port,
            b"POST " + origin.url("/f").encode() + b" HTTP/1.1\r\nhost: mcc.test\r\n"
            b"x-note: caf\xe9\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
        )
        assert out.startswith(b"HTTP/1.1 "), out[:100]
        assert origin.count("/f", "POST") == 1
        await _healthy(node)


async def test_a_stored_etag_with_obs_text_revalidates_and_survives_restart(
    tmp_path: Path,
) -> None:
    etag = b'"v\xfc1"'

    def respond(req: RawRequest) -> Reply:
        if req.headers.get("if-none-match") == etag:
            return Reply([response(b"304 Not Modified", [(b"etag", etag)], length=False)])
        return Reply([ranged(req, DATA, [(b"etag", etag), (b"cache-control", b"max-age=0")])])

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        for _ in range(2):  # the second node starts on the stored ETag
            async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
                for _ in range(2):
                    r = await get(node.port, origin.url("/e"))
                    assert r.status == 200 and r.body == DATA
                    await node.cache.wait_idle()  # else the next one joins this fetch
                await _healthy(node)
        assert sum(1 for r in origin.requests if r.headers.get("if-none-match") == etag) >= 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("location", [b"/moved here", b"/moved-\xfc"])
async def test_a_redirect_with_odd_bytes_is_followed_safely(
    tmp_path: Path, location: bytes
) -> None:
    def respond(req: RawRequest) -> Reply:
        if req.target == "/start":
            return Reply([response(b"302 Found", [(b"location", location)])])
        return Reply([ranged(req, DATA)])

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            r = await get(node.port, origin.url("/start"))
            assert r.status == 200 and r.body == DATA
            # the target went out percent-encoded, never as raw bytes
            assert {q.target for q in origin.requests} - {"/start"} <= {
                "/moved%20here",
                "/moved-%C3%BC",
            }
            await _healthy(node)
        nursery.cancel_scope.cancel()


async def test_utf8_content_disposition_is_replayed_byte_for_byte(tmp_path: Path) -> None:
    disposition = 'attachment; filename="résumé.bin"'.encode()

    def respond(req: RawRequest) -> Reply:
        return Reply([ranged(req, DATA, [(b"content-disposition", disposition)])])

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            for _ in range(2):  # miss, then hit
                out = await raw_exchange(node.port, _raw_get(node, origin.url("/d")))
                head, _, body = out.partition(b"\r\n\r\n")
                assert b"\r\ncontent-disposition: " + disposition + b"\r\n" in head.lower() or (
                    disposition in head
                )
                assert body == DATA
                await node.cache.wait_idle()
        nursery.cancel_scope.cancel()


async def test_a_bug_in_one_fill_fails_its_requests_and_nothing_else(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin.put("/bad", DATA)
    origin.put("/good", DATA[::-1])
    real_fill = mcc.Cache._fill

    async def fill(self: mcc.Cache, meta: Any, *args: Any) -> None:
        if meta.key.endswith("/bad"):
            raise RuntimeError("injected fault")
        await real_fill(self, meta, *args)

    monkeypatch.setattr(mcc.Cache, "_fill", fill)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(_expect_failure, node, origin.url("/bad"))
            nursery.start_soon(_expect_bytes, node, origin.url("/good"), DATA[::-1])
        assert node.cache.statistics().internal_errors >= 1
        assert (await get(node.port, origin.url("/good"))).body == DATA[::-1]
        await _healthy(node)


async def test_a_fault_in_a_discovery_after_its_blocks_are_claimed_strands_no_flight(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a discovery claims the blocks of a range it asks for before it files the record:
    # a fault in between must fail those flights, or the next reader joins one nobody fills
    origin.put("/r", DATA)
    real_adopt = mcc.Cache._adopt
    faults = [RuntimeError("injected fault")]

    def adopt(self: mcc.Cache, meta: Any) -> None:
        if faults:
            raise faults.pop()
        real_adopt(self, meta)

    monkeypatch.setattr(mcc.Cache, "_adopt", adopt)
    block = 64 * 1024
    span = f"bytes={block // 2}-{3 * block + 10}"
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], block_size="64KiB"
    ) as node:
        with trio.fail_after(20):
            first = await get(node.port, origin.url("/r"), headers=[("range", span)])
            assert first.status >= 500
            again = await get(node.port, origin.url("/r"), headers=[("range", span)])
        assert again.status == 206 and again.body == DATA[block // 2 : 3 * block + 11]
        await _healthy(node)


async def _expect_failure(node: Node, url: str) -> None:
    try:
        r = await get(node.port, url)
    except (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError):
        return  # cut after the head: an honest failure
    assert r.status >= 500


async def _expect_bytes(node: Node, url: str, data: bytes) -> None:
    r = await get(node.port, url)
    assert r.status == 200 and r.body == data


# -- desync: bytes an origin sends that no request asked for ----------------------


async def test_bytes_after_a_content_length_body_never_reach_another_object(
    tmp_path: Path,
) -> None:
    poison = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncache-control: max-age=999\r\n\r\nEVIL!"

    def respond(req: RawRequest) -> Reply:
        if req.target == "/a":
            # the answer, then (in a later segment) a whole forged response
            return Reply([ranged(req, b"first"), poison], gap=0.05)
        return Reply([ranged(req, b"second-object")])

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            assert (await get(node.port, origin.url("/a"))).body == b"first"
            await trio.sleep(0.2)  # the forged bytes are in the pooled connection now
            r = await get(node.port, origin.url("/b"))
            assert r.body == b"second-object"
            assert (await get(node.port, origin.url("/b"))).body == b"second-object"
        nursery.cancel_scope.cancel()


async def test_a_body_sent_after_a_head_response_never_reaches_another_object(
    tmp_path: Path,
) -> None:
    def respond(req: RawRequest) -> Reply:
        if req.method == "HEAD":
            forged = response(b"200 OK", [(b"cache-control", b"max-age=999")], b"EVIL!")
            return Reply([ranged(req, b"x" * 10) + forged])
        return Reply([ranged(req, b"real-bytes")])

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            r = await get(node.port, origin.url("/h"), method="HEAD")
            assert r.status == 200
            await trio.sleep(0.1)
            for _ in range(2):
                assert (await get(node.port, origin.url("/g"))).body == b"real-bytes"
        nursery.cancel_scope.cancel()


# -- hypothesis: arbitrary bytes from clients and origins -------------------------

_header_bytes = st.binary(min_size=0, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=_header_bytes, name=st.sampled_from([b"via", b"x-any", b"if-range", b"range"]))
async def test_arbitrary_request_header_values_never_kill_the_node(
    origin: Origin, tmp_path_factory: pytest.TempPathFactory, value: bytes, name: bytes
) -> None:
    origin.put("/f", DATA)
    async with run_node(tmp_path_factory.mktemp("c"), allow_origins=[origin.authority]) as node:
        out = await raw_exchange(
            node.port, _raw_get(node, origin.url("/f"), name + b": " + value + b"\r\n")
        )
        if out:
            status = int(out[9:12])
            head, _, body = out.partition(b"\r\n\r\n")
            assert status in (200, 206) or 400 <= status < 600, head
            if status == 200:
                assert body == DATA
            if status == 206:
                assert body and body in DATA
        await _healthy(node)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
# a bare LF in a field's value ends the head early for a lenient reader, and the rest
# of the head became the "body" (found by this test)
@example(status_line=b"200", name=b"!", value=b"\n")
@example(status_line=b"200 OK", name=b"\n", value=b"x")
# a value holding an empty line ends the origin's head there: what follows is the
# body the origin sent (its real fields and DATA), passed on faithfully
@example(status_line=b"200", name=b"!", value=b"\r\n\r\n")
@given(
    status_line=st.one_of(
        st.binary(max_size=30), st.sampled_from([b"200 OK", b"206 Partial Content", b"999 X"])
    ),
    name=st.one_of(st.binary(min_size=1, max_size=20), st.sampled_from([b"etag", b"location"])),
    value=_header_bytes,
)
async def test_arbitrary_origin_heads_never_kill_the_node(
    tmp_path_factory: pytest.TempPathFactory, status_line: bytes, name: bytes, value: bytes
) -> None:
    sent: list[bytes] = []  # the body of each response, as its head's end makes it

    def respond(req: RawRequest) -> Reply:
        good = ranged(req, DATA, [(name, value)])
        line_end = good.index(b"\r\n")
        raw = b"HTTP/1.1 " + status_line + good[line_end:]
        sent.append(raw.partition(b"\r\n\r\n")[2])
        return Reply([raw], close=True)

    async with trio.open_nursery() as nursery:
        origin = await _serve_raw(nursery, respond)
        async with run_node(
            tmp_path_factory.mktemp("c"),
            allow_origins=[origin.authority],
            limits={"upstream_retries": 0},
        ) as node:
            with trio.fail_after(20):
                try:
                    r = await get(node.port, origin.url("/o"))
                except EOFError:
                    r = None  # a cut connection: an honest failure
            if r is not None and r.status in (200, 206):
                bodies = [DATA, *sent]
                assert any(r.body == b[: len(r.body)] for b in bodies) or r.body in DATA
            elif r is not None:
                assert 300 <= r.status < 600
            await _healthy(node)
            assert node.cache.statistics().internal_errors == 0
        nursery.cancel_scope.cancel()


async def test_a_url_over_the_limit_gets_414(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        r = await get(node.port, origin.url("/f") + "?q=" + "x" * MAX_TARGET)
        assert r.status == 414
        assert origin.requests == []  # nothing forwarded
        await _healthy(node)


async def test_unique_long_urls_keep_the_index_within_max_size(
    origin: Origin, tmp_path: Path
) -> None:
    """3,000 tiny objects under 6 KB URLs: the index's rows count against max_size,
    and eviction drops records, not only blobs."""
    origin.put("/q", b"0123456789")
    max_size = 4 * 1024 * 1024
    async with mcc.open_cache(
        cache_dir=tmp_path,
        allow_origins=[origin.authority],
        block_size="64KiB",
        drives=[{"path": str(tmp_path), "max_size": max_size}],
        # a group commit lands its rows at once: 64 rows of 12 KB keys would be a
        # fifth of this tiny max_size before eviction sees them
        commit_batch=4,
    ) as cache:
        for i in range(3000):
            url = origin.url(f"/q?{i}-" + "x" * 6000)
            chunks = [c async for c in cache.read(url)]
            assert b"".join(chunks) == b"0123456789"
            if i % 500 == 499:
                await cache.wait_idle()
                await cache.evict()
                assert cache.store.used_bytes_on(0) <= max_size
        await cache.wait_idle()
        await cache.evict()
        await trio.to_thread.run_sync(cache.index.checkpoint)
        index_file = (tmp_path / "index.sqlite3").stat().st_size
        assert index_file + cache.index.stored_bytes_on(0) <= max_size, index_file
        assert cache.statistics().evictions > 0
        assert len(cache.store.object_keys()) < 3000  # records went with their blobs
