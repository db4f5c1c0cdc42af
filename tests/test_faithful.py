"""Faithful responses: the header fields an origin sends are stored and replayed
(RFC 9111 s3.1, s3.2, s4.2.3), with table-driven tests of :mod:`mcc.policy` and
round trips through a node."""

from __future__ import annotations

import email.utils
import os
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fixtures.raw_origin import RawOrigin, RawRequest, Reply, ranged, response
from mcc.headers import parse_cache_control
from mcc.policy import (
    invalidated,
    object_key,
    record,
    refreshed,
    refusal,
    selecting_fields,
    stored_fields,
    variant_key,
    variant_names,
)
from tests.helpers import Response, get, run_node

DATA = os.urandom(100_000)
NOW = 1_800_000_000.0


def _values(r: Response, name: str) -> list[str]:
    return [v for k, v in r.headers if k == name]


# -- policy tables ---------------------------------------------------------------

STORED_FIELDS = [
    # (response fields, names stored) -- "age" (the record's own) always ends the list
    ([("x-custom", "abc"), ("link", "</x>; rel=preload")], ["x-custom", "link"]),
    # hop-by-hop (RFC 9110 s7.6.1), and what Connection names
    (
        [
            ("connection", "x-secret, close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authentication-info", "a=b"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ],
        ["x-kept"],
    ),
    # what the cache writes itself per response
    (
        [
            ("content-length", "5"),
            ("content-range", "bytes 0-4/5"),
            ("age", "7"),
            ("cache-status", "up; hit"),
            ("accept-ranges", "bytes"),
        ],
        [],
    ),
    # no-cache="f" and private="f" keep those fields out, quoted commas and all
    (
        [
            ("cache-control", 'max-age=60, no-cache="set-cookie, x-a", private="X-B"'),
            ("set-cookie", "s=1"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ],
        ["cache-control", "x-c"],
    ),
    # obs-text and repeated fields kept as they came, in order
    ([("x-note", "caf\xe9"), ("link", "<a>"), ("link", "<b>")], ["x-note", "link", "link"]),
]


@pytest.mark.parametrize(("fields", "names"), STORED_FIELDS)
def test_stored_fields(fields: list[tuple[str, str]], names: list[str]) -> None:
    stored = stored_fields(fields, NOW)
    assert [k for k, _ in stored] == [*names, "age"]
    for k, v in stored[:-1]:
        assert (k, v) in fields  # values byte for byte


AGES = [
    # (Age, Date seconds before receipt, corrected initial age)
    (None, None, 0),
    ("30", None, 30),
    (None, 100, 100),  # apparent age from Date
    ("30", 100, 100),
    ("500", 100, 500),
    ("junk", None, 0),
    (None, -50, 0),  # a Date in the future is no age
]


@pytest.mark.parametrize(("age_value", "date_before", "expected"), AGES)
def test_corrected_initial_age(
    age_value: str | None, date_before: int | None, expected: int
) -> None:
    fields = []
    if age_value is not None:
        fields.append(("age", age_value))
    if date_before is not None:
        fields.append(("date", email.utils.formatdate(NOW - date_before, usegmt=True)))
    assert dict(stored_fields(fields, NOW))["age"] == str(expected)


REFUSALS = [
    (200, [("cache-control", "private")], True),
    (200, [("cache-control", 'private="set-cookie"')], False),
    (200, [("cache-control", "no-store")], True),
    (200, [("cache-control", 'no-cache="x-a"')], False),
    (404, [], True),
]


@pytest.mark.parametrize(("status", "fields", "refused"), REFUSALS)
def test_refusal(status: int, fields: list[tuple[str, str]], refused: bool) -> None:
    assert (refusal(status, fields) is not None) is refused


def test_refreshed_replaces_fields_by_name_and_keeps_the_version() -> None:
    first = [("etag", '"v1"'), ("x-a", "1"), ("link", "<a>"), ("link", "<b>"), ("x-keep", "k")]
    meta = record("http://h/x", 10, first, now=NOW, fetch_url="http://h/x", block_size=4)
    update = [("etag", '"v2"'), ("x-a", "2"), ("link", "<c>"), ("x-new", "n"), ("age", "3")]
    after = refreshed(meta, update, NOW + 60)
    assert after.etag == '"v1"' and after.version == meta.version
    assert after.fetched_at == NOW + 60
    fields = [(k, v) for k, v in after.headers]
    assert ("x-keep", "k") in fields and ("x-a", "2") in fields and ("x-new", "n") in fields
    assert [v for k, v in fields if k == "link"] == ["<c>"]
    assert ("x-a", "1") not in fields and [v for k, v in fields if k == "age"] == ["3"]


@given(st.text())
def test_cache_control_parses_any_text(value: str) -> None:
    directives = parse_cache_control(value)
    assert all(name == name.lower() and name.strip() == name for name in directives)
    if '"' not in value:  # without quotes, members are the plain comma list
        names = {p.strip().partition("=")[0].strip().lower() for p in value.split(",")}
        assert set(directives) == names - {""}


# -- through a node ----------------------------------------------------------------


async def test_fields_round_trip_on_miss_hit_and_head(tmp_path: Path) -> None:
    """Regression: only a fixed list of fields came through; X-Custom, Link and the
    origin's Date were dropped on misses and hits alike."""
    date = email.utils.formatdate(time.time() - 100, usegmt=True)
    extra = [
        (b"etag", b'"v1"'),
        (b"cache-control", b"max-age=3600"),
        (b"x-custom", b"abc"),
        (b"link", b"</x>; rel=preload"),
        (b"x-note", b"caf\xe9"),
        (b"date", date.encode()),
        (b"server", b"origin/1"),
    ]

    def respond(req: RawRequest) -> Reply:
        return Reply([ranged(req, DATA, extra)])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            miss = await get(node.port, url)
            await node.cache.wait_idle()
            hit = await get(node.port, url)
            head = await get(node.port, url, method="HEAD")
            assert miss.body == DATA and hit.body == DATA and head.body == b""
            assert "hit" in (hit.header("cache-status") or "")
            for r in (miss, hit, head):
                assert r.header("x-custom") == "abc", r.headers
                assert r.header("link") == "</x>; rel=preload"
                assert r.header("x-note") == "caf\xe9"  # obs-text, byte for byte
                assert _values(r, "date") == [date]  # the origin's, not a second one
                assert _values(r, "server") == ["origin/1"]
                assert len(_values(r, "etag")) == 1 and len(_values(r, "accept-ranges")) == 1
                assert len(_values(r, "age")) == 1
                assert int(r.header("age") or 0) >= 100  # RFC 9111 s4.2.3 apparent age
                assert r.header("content-length") == str(len(DATA))
        nursery.cancel_scope.cancel()


async def test_hop_by_hop_fields_are_dropped_including_those_connection_names(
    tmp_path: Path,
) -> None:
    hop = [
        (b"connection", b"x-secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-authentication-info", b"a=b"),
        (b"trailer", b"x-t"),
        (b"upgrade", b"h2c"),
        (b"x-kept", b"yes"),
        (b"cache-control", b"max-age=3600"),
    ]

    def respond(req: RawRequest) -> Reply:
        if req.method == "POST":
            return Reply([response(b"200 OK", hop, b"done")])
        return Reply([ranged(req, DATA, hop)])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            miss = await get(node.port, url)
            await node.cache.wait_idle()
            hit = await get(node.port, url)
            passed = await get(node.port, url, method="POST", body=b"x")
            for r in (miss, hit, passed):
                names = {k for k, _ in r.headers}
                assert r.header("x-kept") == "yes", r.headers
                assert not names & {
                    "x-secret",
                    "keep-alive",
                    "proxy-authentication-info",
                    "trailer",
                    "upgrade",
                }, names
        nursery.cancel_scope.cancel()


async def test_a_304_updates_the_stored_fields(tmp_path: Path) -> None:
    """Regression: a 304 carrying X-Updated left the client with no X-Updated at all."""
    answers = iter([b"2", b"3"])

    def respond(req: RawRequest) -> Reply:
        if req.headers.get("if-none-match") == b'"v1"':
            fields = [(b"etag", b'"v1"'), (b"x-updated", next(answers, b"9"))]
            return Reply([response(b"304 Not Modified", fields, length=False)])
        fields = [
            (b"etag", b'"v1"'),
            (b"cache-control", b"max-age=0"),
            (b"x-updated", b"1"),
            (b"x-keep", b"k"),
        ]
        return Reply([ranged(req, DATA, fields)])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            seen = []
            for _ in range(3):
                r = await get(node.port, url)
                await node.cache.wait_idle()
                assert r.body == DATA and r.header("x-keep") == "k", r.headers
                seen.append(_values(r, "x-updated"))
            assert seen == [["1"], ["2"], ["3"]]
            stored = node.cache.store.get_object(node.cache.resolve(url))
            assert stored is not None and ("x-updated", "3") in stored.headers
        nursery.cancel_scope.cancel()


async def test_a_same_version_206_on_revalidation_updates_the_stored_fields(
    tmp_path: Path,
) -> None:
    """An origin ignoring If-None-Match resends the same version: its fields update
    the stored ones (RFC 9111 s3.2); fields it does not send stay."""
    count = iter(range(1, 100))

    def respond(req: RawRequest) -> Reply:
        n = str(next(count)).encode()
        fields = [(b"etag", b'"v1"'), (b"cache-control", b"max-age=0"), (b"x-updated", n)]
        if n == b"1":
            fields.append((b"x-first", b"only"))
        return Reply([ranged(req, DATA, fields)])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/f")
            first = await get(node.port, url)
            await node.cache.wait_idle()
            second = await get(node.port, url)
            assert first.body == second.body == DATA
            assert first.header("x-updated") == "1"
            assert _values(second, "x-updated") == [str(len(origin.requests))]
            assert second.header("x-first") == "only"
        nursery.cancel_scope.cancel()


INVALIDATIONS = [
    # (method, status, fields, URLs invalidated besides the target)
    ("POST", 201, [("location", "/new"), ("content-location", "http://h/c?x")], ["/new", "/c?x"]),
    ("PUT", 204, [("location", "http://other/new"), ("location", "https://h/new")], []),
    ("DELETE", 200, [("content-location", "../up")], ["/up"]),
    ("POST", 500, [("location", "/new")], None),  # an error invalidates nothing
    ("GET", 200, [("location", "/new")], None),  # a safe method neither
    ("POST", 302, [("location", "http://[bad/")], []),
]


@pytest.mark.parametrize(("method", "status", "fields", "urls"), INVALIDATIONS)
def test_invalidated_urls(
    method: str, status: int, fields: list[tuple[str, str]], urls: list[str] | None
) -> None:
    got = invalidated(method, "http://h/a/b", status, fields)
    if urls is None:
        assert got == []
    else:
        assert got == ["http://h/a/b", *(f"http://h{u}" for u in urls)]


async def test_an_unsafe_method_invalidates_location_and_content_location(
    tmp_path: Path,
) -> None:
    def respond(req: RawRequest) -> Reply:
        if req.method == "POST":
            fields = [
                (b"location", b"/other"),
                (b"content-location", f"http://{req.headers['host'].decode()}/third".encode()),
            ]
            return Reply([response(b"201 Created", fields, b"made")])
        return Reply([ranged(req, DATA, [(b"cache-control", b"max-age=3600")])])

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            paths = ("/other", "/third", "/untouched")
            for path in paths:
                await get(node.port, origin.url(path))
                await node.cache.wait_idle()
            for path in paths:
                assert (await get(node.port, origin.url(path))).header(
                    "cache-status"
                ) == "node; hit"
            r = await get(node.port, origin.url("/form"), method="POST", body=b"x")
            assert r.status == 201
            after = {p: (await get(node.port, origin.url(p))).header("cache-status") for p in paths}
            assert after == {
                "/other": "node; fwd=miss; stored",
                "/third": "node; fwd=miss; stored",
                "/untouched": "node; hit",
            }
        nursery.cancel_scope.cancel()


def _by_language(req: RawRequest) -> Reply:
    lang = req.headers.get("accept-language", b"en")
    body = lang * 30_000
    fields = [
        (b"vary", b"Accept-Language"),
        (b"etag", b'"' + lang + b'"'),
        (b"cache-control", b"max-age=3600"),
        (b"content-language", lang),
    ]
    return Reply([ranged(req, body, fields)])


async def test_two_accept_language_values_are_two_variants_each_a_hit(tmp_path: Path) -> None:
    """Regression: a response with Vary on anything but Accept-Encoding was never stored."""
    async with trio.open_nursery() as nursery:
        origin = RawOrigin(_by_language)
        await nursery.start(origin.serve)
        async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
            url = origin.url("/page")
            for lang in ("de", "fr"):
                r = await get(node.port, url, [("accept-language", lang)])
                assert r.body == lang.encode() * 30_000 and r.header("content-language") == lang
                await node.cache.wait_idle()
            asked = len(origin.requests)
            for lang in ("fr", "de"):
                r = await get(node.port, url, [("accept-language", lang)])
                assert r.body == lang.encode() * 30_000, lang
                assert r.header("cache-status") == "node; hit" and r.header("vary")
            assert len(origin.requests) == asked  # both variants came from the store
            # every upstream request for a variant's bytes carried its selecting field
            assert all(q.headers.get("accept-language") for q in origin.requests[1:])
            keys = [k for k in node.cache.store.object_keys() if "#vary;" in k]
            assert len(keys) == 2
            # PURGE of the URL drops every variant
            assert await node.cache.purge(url)
            assert not [k for k in node.cache.store.object_keys() if k.startswith(url)]
        nursery.cancel_scope.cancel()


async def test_variants_beyond_the_limit_and_vary_star_are_forwarded(tmp_path: Path) -> None:
    def respond(req: RawRequest) -> Reply:
        if req.target == "/star":
            fields = [(b"vary", b"*"), (b"cache-control", b"max-age=3600")]
            return Reply([ranged(req, b"star" * 100, fields)])
        return _by_language(req)

    async with trio.open_nursery() as nursery:
        origin = RawOrigin(respond)
        await nursery.start(origin.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[origin.authority], limits={"max_variants": 1}
        ) as node:
            url = origin.url("/page")
            statuses = []
            for lang in ("de", "fr", "fr"):
                r = await get(node.port, url, [("accept-language", lang)])
                assert r.body == lang.encode() * 30_000
                statuses.append(r.header("cache-status"))
                await node.cache.wait_idle()
            assert statuses[0] == "node; fwd=miss; stored"
            assert statuses[1:] == ["node; fwd=uri-miss"] * 2  # over the limit: forwarded
            for _ in range(2):
                r = await get(node.port, origin.url("/star"))
                assert r.body == b"star" * 100 and r.header("cache-status") == "node; fwd=uri-miss"
        nursery.cancel_scope.cancel()


_latin1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)
_names = st.sampled_from(["accept-language", "user-agent", "x-a", "cookie"])


@given(st.lists(_names, unique=True, min_size=1), st.lists(st.tuples(_names, _latin1)))
def test_a_variant_key_gives_back_the_fields_it_was_made_from(
    names: list[str], request: list[tuple[str, str]]
) -> None:
    names.sort()
    key = variant_key("http://h/x?q=1", names, request)
    assert object_key(key) == "http://h/x?q=1"
    assert variant_names(key) == tuple(names)
    sent = dict(selecting_fields(key))
    for name in names:
        values = [v for k, v in request if k == name]
        if values:
            assert sent[name] == " ".join(", ".join(values).split())
        else:
            assert name not in sent
    # made again from its own key (a variant asked anew): the same key
    assert variant_key(key, names, request) == key


@given(
    st.lists(
        st.tuples(st.sampled_from(["connection", "cache-control", "x-a", "age", "date"]), _latin1)
    )
)
def test_stored_fields_takes_any_fields(fields: list[tuple[str, str]]) -> None:
    stored = stored_fields(fields, NOW)
    assert stored[-1][0] == "age" and stored[-1][1].isdigit()
    assert not {k for k, _ in stored[:-1]} & {"connection", "age"}
