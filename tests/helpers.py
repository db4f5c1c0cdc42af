"""Test helpers: a real mcc node in the test's nursery, and small HTTP clients."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

import mcc
from mcc.http.protocol import Request, ServerProtocol
from mcc.http.server import Server
from mcc.ops.admin import AdminServer
from mcc.ops.client import ADMIN_HEADER


@attrs.define
class Node:
    """A running mcc node: its server, admin API and cache."""

    server: Server
    admin: AdminServer
    cache: mcc.Cache
    port: int
    admin_port: int
    tls_port: int | None = None

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_authority(self) -> str:
        """What a client of the admin API puts in Host."""
        return f"127.0.0.1:{self.admin_port}"


@asynccontextmanager
async def run_node(cache_dir: Path, **overrides: Any) -> AsyncIterator[Node]:
    """Start a node on ephemeral loopback ports; stops when the block exits."""
    overrides.setdefault("listen", ["127.0.0.1:0"])
    overrides.setdefault("admin_listen", "127.0.0.1:0")
    overrides.setdefault("block_size", "64KiB")
    overrides.setdefault("node_id", "node")
    if overrides["node_id"] is None:  # the default node id (host name and listen port)
        del overrides["node_id"]
    overrides.setdefault("access_log", "")
    async with mcc.open_cache(cache_dir=cache_dir, **overrides) as cache:
        server = Server(cache.config, cache)
        admin = AdminServer(cache, server.metrics, lambda: server.open_connections)
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(server.serve)
            admin_port = await nursery.start(admin.serve)
            server.admin_port = admin_port
            try:
                tls_port = server.tls_ports[0] if server.tls_ports else None
                yield Node(server, admin, cache, ports[0], admin_port, tls_port)
            finally:
                nursery.cancel_scope.cancel()


@attrs.frozen
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Client:
    """One keep-alive client connection speaking h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[Client]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            yield cls(stream)
        finally:
            await stream.aclose()

    @classmethod
    @asynccontextmanager
    async def connect_tls(
        cls, port: int, context: ssl.SSLContext, server_hostname: str = "127.0.0.1"
    ) -> AsyncIterator[Client]:
        """The same client over TLS (h11 over :class:`trio.SSLStream`)."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, context, server_hostname=server_hostname)
        try:
            yield cls(stream)
        finally:
            with trio.move_on_after(1):
                await stream.aclose()

    async def request(
        self,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        method: str = "GET",
        body: bytes | None = None,
        host: str = "mcc.test",
    ) -> Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", host), *headers]
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        return await self.read_response()

    async def read_response(self) -> Response:
        head: h11.Response | None = None
        chunks = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(1 << 20)))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
                return Response(head.status_code, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("server closed before the response ended")
            else:
                raise AssertionError(f"unexpected {event!r}")


async def get(
    port: int,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    method: str = "GET",
    host: str = "mcc.test",
    body: bytes | None = None,
) -> Response:
    """One request on a fresh connection."""
    async with Client.connect(port) as c:
        return await c.request(target, headers, method=method, host=host, body=body)


async def admin_call(
    node: Node,
    path: str,
    doc: Any = None,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str | None = None,
) -> Response:
    """One admin API request the way ``mcc warm|purge|stats`` sends it: the admin's own
    Host and, with a ``doc``, a POST of JSON carrying the X-MCC-Admin header."""
    body = None if doc is None else json.dumps(doc).encode()
    hdrs = list(headers)
    if body is not None:
        hdrs += [("content-type", "application/json"), (ADMIN_HEADER, "1")]
    method = method or ("GET" if body is None else "POST")
    return await get(
        node.admin_port, path, hdrs, method=method, host=node.admin_authority, body=body
    )


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5) -> bytes:
    """Send raw bytes, then read until the server closes (or the timeout)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    try:
        # a reset by the server ends the exchange as a close does
        with contextlib.suppress(trio.BrokenResourceError), trio.move_on_after(read_timeout):
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                out += chunk
    finally:
        await stream.aclose()
    return out


class ConnectionPair:
    """An h11 client joined to mcc's ServerProtocol with no I/O (after h11's tests)."""

    def __init__(self) -> None:
        self.client = h11.Connection(h11.CLIENT)
        self.server = ServerProtocol()

    def send_request(self, method: str, target: str, headers: Sequence[tuple[str, str]]) -> Request:
        data = self.client.send(h11.Request(method=method, target=target, headers=list(headers)))
        data = (data or b"") + (self.client.send(h11.EndOfMessage()) or b"")
        self.server.receive_data(data)
        event = self.server.next_event()
        assert isinstance(event, Request)
        return event


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def serve_argv(port: int, cache_dir: Path, origin_authority: str, *extra: str) -> list[str]:
    """The command line of a real ``mcc serve`` on loopback for one test origin."""
    return [
        sys.executable, "-m", "mcc", "serve",
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
        "--cache-dir", str(cache_dir), "--allow-origin", origin_authority,
        "--access-log", "", *extra,
    ]  # fmt: skip


async def wait_serving(port: int, within: float = 20) -> None:
    """Wait until an mcc process on ``port`` answers its own /health."""
    with trio.fail_after(within):
        while True:
            try:
                await get(port, "/health", host=f"127.0.0.1:{port}")
                return
            except OSError:
                await trio.sleep(0.05)


@asynccontextmanager
async def tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (skips without root)."""
    await trio.Path(path).mkdir(parents=True, exist_ok=True)
    r = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_stderr=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        await trio.run_process(["umount", "-l", str(path)], check=False)
