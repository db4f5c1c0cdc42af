"""The sans-I/O protocol layer: no sockets, an h11 client on the other side."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcc.errors import BadRequest
from mcc.http.protocol import CLOSED, END_OF_BODY, NEED_DATA, Request, ServerProtocol
from mcc.http.routing import OwnNames, route_request
from mcc.origins import OriginPolicy
from tests.helpers import ConnectionPair


def test_request_response_cycle_seen_by_both_sides() -> None:
    pair = ConnectionPair()
    req = pair.send_request("GET", "/x", [("host", "a"), ("Range", "bytes=0-1")])
    assert req.method == "GET" and req.target == "/x" and req.header("range") == "bytes=0-1"
    assert pair.server.next_event() is END_OF_BODY
    head = pair.server.response_head(206, [("content-length", "2")])
    pieces = pair.server.body(b"ab")
    data = head + b"".join(pieces) + pair.server.end()
    pair.client.receive_data(data)
    resp = pair.client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 206
    assert resp.reason == b"Partial Content"
    assert isinstance(pair.client.next_event(), h11.Data)
    assert isinstance(pair.client.next_event(), h11.EndOfMessage)
    assert pair.server.reusable


def test_sendfile_passthrough_object_comes_back_untouched() -> None:
    pair = ConnectionPair()
    pair.send_request("GET", "/x", [("host", "a")])
    pair.server.response_head(200, [("content-length", "5")])

    class Body:
        def __len__(self) -> int:
            return 5

    body = Body()
    assert pair.server.body(body) == [body]


def test_closed_between_requests() -> None:
    p = ServerProtocol()
    assert p.next_event() is NEED_DATA
    p.receive_data(b"")
    assert p.next_event() is CLOSED


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 20000, 431),  # incomplete
        (b"\x00\x01\x02\r\n\r\n", 400),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\tfolded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ],
)
def test_bad_heads_raise_bad_request_with_status(raw: bytes, status: int) -> None:
    p = ServerProtocol()
    p.receive_data(raw)
    with pytest.raises(BadRequest) as info:
        p.next_event()
    assert info.value.status_hint == status
    out = p.error_response(status, str(info.value))
    assert out is not None and out.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close" in out


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_give_events_or_bad_request(data: bytes, byte_by_byte: bool) -> None:
    """h11's fuzz idea: arbitrary input only ever yields events or a 4xx BadRequest."""
    p = ServerProtocol()
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    try:
        for chunk in chunks:
            p.receive_data(chunk)
            while True:
                event = p.next_event()
                if event is NEED_DATA or event is CLOSED:
                    break
                assert isinstance(event, (Request, bytes)) or event is END_OF_BODY
                if event is END_OF_BODY:
                    break
    except BadRequest as exc:
        assert 400 <= exc.status_hint < 500


@settings(max_examples=200)
@given(
    st.sampled_from(["GET", "HEAD", "POST"]),
    st.text(alphabet="abcXYZ/.-_~%?&=019", max_size=40),
    st.text(alphabet="abc.-:019[]", max_size=20),
)
def test_well_formed_requests_round_trip(method: str, path: str, host: str) -> None:
    target = "/" + path
    pair = ConnectionPair()
    try:
        req = pair.send_request(method, target, [("host", host or "h")])
    except h11.LocalProtocolError:
        return  # the client refuses to produce it; nothing to check
    assert req.method == method and req.target == target


OWN = OwnNames.build([("127.0.0.1", 8080)], "edge")


@pytest.mark.parametrize(
    ("target", "host", "url", "form"),
    [
        ("/p?a=1&cacheHostOrigin=dl.example.com", "edge", "http://dl.example.com/p?a=1", "do"),
        ("/p?cacheHostOrigin=dl.example.com:8000", None, "http://dl.example.com:8000/p", "do"),
        ("/p?CACHEHOSTORIGIN=dl.example.com", None, "http://dl.example.com/p", "do"),
        ("http://Mirror.Example.ORG./d/x", "spoofed", "http://mirror.example.org/d/x", "proxy"),
        ("http://mirror:81", None, "http://mirror:81/", "proxy"),
        ("/d/x", "mirror.example.org", "http://mirror.example.org/d/x", "host"),
        ("/d/x", "127.0.0.1:9000", "http://127.0.0.1:9000/d/x", "host"),
        ("https://Mirror.Example.ORG/d/x", None, "https://mirror.example.org/d/x", "proxy"),
        ("https://mirror:443/x?q", None, "https://mirror/x?q", "proxy"),
        ("https://mirror:8443", None, "https://mirror:8443/", "proxy"),
    ],
)
def test_routing_forms(target: str, host: str | None, url: str, form: str) -> None:
    r = route_request(target, host, OWN, None)
    assert (r.url, r.form) == (url, form)


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "edge", None])
def test_own_names_need_an_origin(host: str | None) -> None:
    with pytest.raises(BadRequest):
        route_request("/x", host, OWN, None)
    assert route_request("/x?q", host, OWN, "http://mirror/").url == "http://mirror/x?q"


@pytest.mark.parametrize(
    "target",
    [
        "https://user@evil/y",
        "*",
        "http://user@evil/",
        "http://[::1/x",
        "/p?cacheHostOrigin=",
        "ftp://x",
    ],
)
def test_bad_targets(target: str) -> None:
    with pytest.raises(BadRequest):
        route_request(target, "edge", OWN, None)


def test_https_marked_allowlist_entries_upgrade_host_only_forms() -> None:
    policy = OriginPolicy.build(
        ["https://secure.example", "https://127.0.0.1:8443", "plain.example"]
    )
    scheme = policy.upstream_scheme
    assert policy.allows("secure.example", 443) and policy.allows("127.0.0.1", 8443)
    for target, host, url in [
        ("/p?cacheHostOrigin=secure.example", None, "https://secure.example/p"),
        ("/p", "secure.example", "https://secure.example/p"),
        ("/p?cacheHostOrigin=127.0.0.1:8443", None, "https://127.0.0.1:8443/p"),
        ("/p?cacheHostOrigin=plain.example", None, "http://plain.example/p"),
        ("/p", "plain.example", "http://plain.example/p"),
        # an explicit http:// URL stays what the client asked for
        ("http://secure.example/p", None, "http://secure.example/p"),
    ]:
        assert route_request(target, host, OWN, None, scheme).url == url, target
    with pytest.raises(ValueError, match="only http:// or https://"):
        OriginPolicy.build(["ftp://x.example"])
