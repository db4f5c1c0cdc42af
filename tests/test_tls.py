"""https origins and parents, and the TLS listener, with a CA made in the test (trustme).

Regression: an ``https://`` target got 400, https origins and parents could not be
configured, and there was no TLS listener.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest
import trio
import trustme

from fixtures.origin import Origin
from mcc.config import load_config
from mcc.errors import ConfigError
from tests.helpers import Client, free_port, get, run_node

DATA = random.Random(5).randbytes(700_000)  # 11 blocks of 64 KiB
RANGES = [(0, 99), (65_530, 140_000), (699_000, 699_999), (123, 123)]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def _cert_files(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(folder / "cert.pem"), append=True)
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
async def https_origin(nursery: trio.Nursery, ca: trustme.CA) -> Origin:
    o = Origin()
    o.tls = _server_context(ca)
    o.put("/f.bin", DATA)
    await nursery.start(o.serve)
    return o


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def _check_object(port: int, target: str, host: str = "mcc.test") -> None:
    """Whole object, ranges, all byte-exact."""
    async with Client.connect(port) as c:
        r = await c.request(target, host=host)
        assert r.status == 200, r.body[:200]
        assert r.body == DATA
        for a, b in RANGES:
            r = await c.request(target, [("range", f"bytes={a}-{b}")], host=host)
            assert r.status == 206 and r.body == DATA[a : b + 1], (a, b)


async def test_https_origin_whole_ranges_and_hits(
    https_origin: Origin, ca_file: Path, tmp_path: Path
) -> None:
    o = https_origin
    async with run_node(
        tmp_path / "c", allow_origins=[f"https://{o.authority}"], upstream_ca_file=str(ca_file)
    ) as node:
        # the DO form names only the host: the https:// allowlist mark picks TLS
        do = f"/f.bin?cacheHostOrigin={o.authority}"
        await _check_object(node.port, do)
        assert o.requests and all(r.target == "/f.bin" for r in o.requests)
        await node.cache.wait_idle()
        fetched = len(o.requests)
        # hits: nothing more upstream, whichever form names the object
        await _check_object(node.port, do)
        await _check_object(node.port, o.url("/f.bin"))  # absolute https:// target
        await _check_object(node.port, "/f.bin", host=o.authority)  # Host form
        r = await get(node.port, do)
        assert r.header("cache-status") == "node; hit"
        assert len(o.requests) == fetched
        # keep-alive pooling over TLS: fewer connections than requests
        assert o.connections < fetched, (o.connections, fetched)
        # http and https objects of one host are different objects
        assert node.cache.resolve(o.url("/f.bin")).startswith("https://")
        assert node.cache.resolve(o.url("/f.bin")) != node.cache.resolve(
            o.url("/f.bin").replace("https://", "http://")
        )


async def test_untrusted_certificate_is_502_and_never_fetched(
    https_origin: Origin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    o = https_origin
    caplog.set_level(logging.INFO)
    async with run_node(tmp_path / "c", allow_origins=[f"https://{o.authority}"]) as node:
        r = await get(node.port, f"/f.bin?cacheHostOrigin={o.authority}")
        assert r.status == 502
        assert b"TLS certificate not trusted" in r.body
    assert o.requests == []  # no request went over an unverified connection
    lines = [rec.getMessage() for rec in caplog.records if "not trusted" in rec.getMessage()]
    assert len(lines) == 1, lines
    assert "certificate verify failed" in lines[0] or "unable to get local issuer" in lines[0]


async def test_ssl_cert_file_is_honoured(
    https_origin: Origin, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    o = https_origin
    async with run_node(tmp_path / "c", allow_origins=[f"https://{o.authority}"]) as node:
        r = await get(node.port, f"/f.bin?cacheHostOrigin={o.authority}")
        assert r.status == 200 and r.body == DATA


async def test_wrong_host_name_is_refused(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    """A certificate for another name, from a trusted CA: the host name check fails."""
    async with trio.open_nursery() as nursery:
        o = Origin()
        o.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("other.example").configure_cert(o.tls)
        o.put("/f.bin", DATA)
        await nursery.start(o.serve)
        async with run_node(
            tmp_path / "c", allow_origins=[f"https://{o.authority}"], upstream_ca_file=str(ca_file)
        ) as node:
            r = await get(node.port, o.url("/f.bin"))
            assert r.status == 502 and b"not trusted" in r.body
        assert o.requests == []
        nursery.cancel_scope.cancel()


async def test_https_parent_over_the_tls_listener(
    https_origin: Origin, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    o = https_origin
    cert, key = _cert_files(ca, tmp_path / "tls")
    async with run_node(
        tmp_path / "parent",
        node_id="parent",
        allow_origins=[f"https://{o.authority}"],
        upstream_ca_file=str(ca_file),
        listen_tls=["127.0.0.1:0"],
        tls_cert=str(cert),
        tls_key=str(key),
    ) as parent:
        assert parent.tls_port is not None
        parent_url = f"https://127.0.0.1:{parent.tls_port}"
        async with run_node(
            tmp_path / "child",
            node_id="child",
            allow_origins=[f"https://{o.authority}"],
            parents=[parent_url],
            origin_fallback=False,
            upstream_ca_file=str(ca_file),
        ) as child:
            do = f"/f.bin?cacheHostOrigin={o.authority}"
            await _check_object(child.port, do)
            await child.cache.wait_idle()
            await parent.cache.wait_idle()
            fetched = len(o.requests)
            # the parent was asked in proxy form for the https URL, over TLS
            assert all(r.target == "/f.bin" for r in o.requests)
            assert all("1.1 child" in r.headers.get("via", "") for r in o.requests)
            await _check_object(child.port, do)
            assert len(o.requests) == fetched
            # the parent holds the object too: a cold child fetches nothing from the origin
        async with run_node(
            tmp_path / "child2",
            node_id="child2",
            allow_origins=[f"https://{o.authority}"],
            parents=[parent_url],
            origin_fallback=False,
            upstream_ca_file=str(ca_file),
        ) as child2:
            await _check_object(child2.port, f"/f.bin?cacheHostOrigin={o.authority}")
            assert len(o.requests) == fetched
        # a child that does not trust the parent's CA gets 502, and says why
        async with run_node(
            tmp_path / "child3",
            node_id="child3",
            allow_origins=[f"https://{o.authority}"],
            parents=[parent_url],
            origin_fallback=False,
        ) as child3:
            r = await get(child3.port, f"/f.bin?cacheHostOrigin={o.authority}")
            assert r.status == 502 and b"not trusted" in r.body


@pytest.fixture
def curl() -> Iterator[str]:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed (.ci/run installs it with apt-get)")
    yield path


async def test_tls_listener_serves_curl_and_h11(
    origin: Origin, ca: trustme.CA, ca_file: Path, tmp_path: Path, curl: str
) -> None:
    origin.put("/f.bin", DATA)
    cert, key = _cert_files(ca, tmp_path / "tls")
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        listen_tls=["127.0.0.1:0"],
        tls_cert=str(cert),
        tls_key=str(key),
    ) as node:
        assert node.tls_port is not None
        base = f"https://127.0.0.1:{node.tls_port}/f.bin?cacheHostOrigin={origin.authority}"
        out = tmp_path / "out"
        for attempt in ("miss", "hit"):
            for args, want in [([], DATA), (["-r", "65530-140000"], DATA[65530:140001])]:
                proc = await trio.run_process(
                    [curl, "-sS", "--fail", "--cacert", str(ca_file), *args, "-o", str(out), base],
                    capture_stderr=True,
                    check=False,
                )
                assert proc.returncode == 0, proc.stderr
                assert out.read_bytes() == want, (attempt, args)
            await node.cache.wait_idle()
        fetched = len(origin.requests)
        # h11 over an SSL stream: keep-alive, whole, ranges, multipart, HEAD; all hits
        async with Client.connect_tls(node.tls_port, _client_context(ca)) as c:
            target = f"/f.bin?cacheHostOrigin={origin.authority}"
            for _ in range(2):
                r = await c.request(target)
                assert r.status == 200 and r.body == DATA
                assert r.header("cache-status") == "node; hit"
                for a, b in RANGES:
                    r = await c.request(target, [("range", f"bytes={a}-{b}")])
                    assert r.status == 206 and r.body == DATA[a : b + 1]
            r = await c.request(target, [("range", "bytes=0-9,100000-100009")])
            assert r.status == 206 and DATA[100000:100010] in r.body and DATA[:10] in r.body
            r = await c.request(target, method="HEAD")
            assert r.status == 200 and r.header("content-length") == str(len(DATA))
        assert len(origin.requests) == fetched
        # a plain-HTTP client on the TLS port is refused, nothing breaks
        with pytest.raises((EOFError, h11.RemoteProtocolError, trio.BrokenResourceError)):
            await get(node.tls_port, target)
        r = await get(node.port, target)
        assert r.status == 200 and r.body == DATA


async def test_tls_handshake_timeout_and_certificate_reload(origin: Origin, tmp_path: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = _cert_files(old_ca, tmp_path / "tls")
    origin.put("/f.bin", DATA)
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        listen_tls=["127.0.0.1:0"],
        tls_cert=str(cert),
        tls_key=str(key),
        timeouts={"request_head": 0.5},
    ) as node:
        assert node.tls_port is not None
        target = f"/f.bin?cacheHostOrigin={origin.authority}"
        # a connection that never starts its handshake is closed after request_head
        stream = await trio.open_tcp_stream("127.0.0.1", node.tls_port)
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""
        await stream.aclose()
        async with Client.connect_tls(node.tls_port, _client_context(old_ca)) as c:
            assert (await c.request(target)).body == DATA
            _cert_files(new_ca, tmp_path / "tls")  # renewed on disk
            node.server.reload_certificates()
            # the running connection keeps its session
            assert (await c.request(target)).body == DATA
        async with Client.connect_tls(node.tls_port, _client_context(new_ca)) as c:
            assert (await c.request(target)).body == DATA
        with pytest.raises(trio.BrokenResourceError):
            async with Client.connect_tls(node.tls_port, _client_context(old_ca)) as c:
                await c.request(target)
        # a broken reload keeps the working certificate
        (tmp_path / "tls" / "key.pem").write_text("garbage")
        with pytest.raises(OSError, match="cannot load TLS certificate"):
            node.server.reload_certificates()
        async with Client.connect_tls(node.tls_port, _client_context(new_ca)) as c:
            assert (await c.request(target)).body == DATA


def test_config_refuses_tls_listener_without_certificate() -> None:
    with pytest.raises(ConfigError, match="listen_tls: needs tls_cert and tls_key"):
        load_config(overrides={"listen_tls": [f"127.0.0.1:{free_port()}"]})


class _ConnectProxy:
    """A tiny HTTP proxy that only tunnels (CONNECT), recording what it was asked."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[str] = []
        self.port = 0

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await client.receive_some(1)
                if not chunk:
                    return
                head += chunk
            method, authority = head.split(b" ")[:2]
            self.asked.append(f"{method.decode()} {authority.decode()}")
            if method != b"CONNECT" or self.refuse:
                await client.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = authority.decode().rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as target:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")

                async def pipe(a: trio.SocketStream, b: trio.SocketStream) -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while data := await a.receive_some(65536):
                            await b.send_all(data)
                    nursery.cancel_scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pipe, client, target)
                    nursery.start_soon(pipe, target, client)


async def test_https_through_upstream_proxy_uses_a_verified_tunnel(
    https_origin: Origin, ca_file: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    o = https_origin
    proxy = _ConnectProxy()
    await nursery.start(proxy.serve)
    async with run_node(
        tmp_path / "c",
        allow_origins=[f"https://{o.authority}"],
        upstream_ca_file=str(ca_file),
        upstream_proxy=f"127.0.0.1:{proxy.port}",
    ) as node:
        await _check_object(node.port, f"/f.bin?cacheHostOrigin={o.authority}")
    assert proxy.asked and set(proxy.asked) == {f"CONNECT {o.authority}"}
    assert all(r.target == "/f.bin" for r in o.requests)  # origin form inside the tunnel
    # a proxy refusing the tunnel, and a proxy-ready origin nobody trusts: 502 both
    refusing = _ConnectProxy(refuse=True)
    await nursery.start(refusing.serve)
    for i, (proxy_port, ca) in enumerate(((refusing.port, str(ca_file)), (proxy.port, None))):
        async with run_node(
            tmp_path / f"refused-{i}",
            allow_origins=[f"https://{o.authority}"],
            upstream_ca_file=ca,
            upstream_proxy=f"127.0.0.1:{proxy_port}",
        ) as node:
            r = await get(node.port, f"/f.bin?cacheHostOrigin={o.authority}")
            assert r.status == 502, r.body
