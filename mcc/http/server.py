"""The trio I/O layer: listeners, one nursery per connection, responses from the engine.

Theory of operation: :class:`Server` accepts connections on every ``listen``
address. Each connection runs :meth:`Server.handle_connection` inside its own
nursery: the request loop reads a head (``request_head`` timeout once bytes start
arriving, ``keepalive`` timeout while idle), routes it, answers it, and loops while
keep-alive holds. Pipelined requests wait in h11's buffer and are answered in order.

GET and HEAD of cacheable objects are answered from the engine: stored blocks go out
with ``os.sendfile``, blocks in flight as they arrive. Anything else (other methods,
requests with credentials, answers upstream marks private) is forwarded unstored.

``listen_tls`` addresses serve the same over TLS (see :mod:`mcc.http.tls`): the
handshake is awaited first, and stored blocks go out by pread through the SSL stream
instead of sendfile.

On SIGTERM or SIGINT the listeners close, idle keep-alive connections are closed,
and responses in progress get ``shutdown_grace`` seconds to finish. On SIGHUP the
logs are reopened and the config reread (see :mod:`mcc.ops.daemon`): new requests
see the new config, responses in progress finish as they started.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import trio

from ..config import Config
from ..engine.blocks import ObjectMeta
from ..engine.engine import Cache, FileSlice, open_cache
from ..errors import BadRequest, NotCacheable, UpstreamError, VersionChanged
from ..ops.accesslog import AccessRecord, configure_logging, write_access
from ..ops.admin import AdminServer
from ..ops.daemon import banner, reload
from ..ops.metrics import Metrics
from ..policy import age
from ..upstream.peers import NODE_HEADER, PEER_HEADER, answering_peer
from .protocol import CLOSED, END_OF_BODY, NEED_DATA, Request, ServerProtocol
from .ranges import UNSATISFIABLE, ByteRange, content_range, if_range_matches, parse_range
from .routing import OwnNames, route_request
from .sendfile import SendfileBody, push, send_bytes, sendfile
from .tls import ServerCertificate, file_pieces

__all__ = ["Server", "run_server"]

log = logging.getLogger("mcc.http")

_RECEIVE_SIZE = 64 * 1024
# After an error response: how long, and how many bytes, to keep reading before close
# (nginx's lingering_close does the same, with 5 s).
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024
# Bytes per send for in-memory chunks; a response is written in pieces this size so
# the send timeout bounds the time any one piece may take (slow-reader floor).
_SEND_PIECE = 256 * 1024
_CREDENTIAL_HEADERS = ("authorization", "cookie")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_REQUEST_HEADERS_FORWARDED_EXCLUDE = frozenset(
    {"host", "connection", "keep-alive", "te", "upgrade", "proxy-connection", "proxy-authorization"}
)


class _ClientGone(Exception):
    """The client stopped reading or closed; the connection is finished."""


_ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class _Conn:
    """Per-connection state shared by the request loop and the drain logic."""

    def __init__(self, stream: _ClientStream, peer: str, max_head: int) -> None:
        self.stream = stream
        self.tls = isinstance(stream, trio.SSLStream)
        self.sock = _socket_stream(stream).socket
        self.peer = peer
        self.proto = ServerProtocol(max_head)
        self.idle_scope: trio.CancelScope | None = None
        self.linger = False  # an error response went out: close gently


class Server:
    """The client-facing HTTP server.

    Args:
      config: the node's configuration.
      cache: the engine answering GET and HEAD.
    """

    def __init__(self, config: Config, cache: Cache) -> None:
        self.config = config
        self.cache = cache
        self.own = OwnNames.build(
            [(a.host, a.port) for a in (*config.listen, *config.listen_tls)], config.node_id
        )
        self.via_token = config.node_id.lower()
        self.metrics = Metrics(cache.policy)
        self._misses: dict[str, int] = {}  # client address -> misses being answered
        self.open_connections = 0
        self.draining = False
        self._conns: set[_Conn] = set()
        self._all_closed = trio.Event()
        self._stopped = trio.Event()
        self.ports: list[int] = []
        self.tls_ports: list[int] = []
        self.certificate: ServerCertificate | None = None
        self._tls_listeners: set[trio.SocketListener] = set()
        self.admin_port: int | None = None  # named in /health answers, for cluster views

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config for new requests (listen and node_id stay as they were);
        the TLS certificate is read again (a renewed one, or new paths)."""
        self.config = config
        if self.certificate is not None:
            try:
                self.certificate.reload(config.tls_cert, config.tls_key)
                log.info("reloaded TLS certificate %s", self.certificate.cert)
            except OSError as exc:
                log.error("reload: %s; the previous certificate stays in use", exc.strerror)

    # -- lifecycle -----------------------------------------------------------------

    async def listen(self) -> list[trio.SocketListener]:
        """Open every ``listen`` address.

        Raises:
          OSError: an address cannot be bound (message names it).
        """
        listeners: list[trio.SocketListener] = []
        cfg = self.config
        if cfg.listen_tls and cfg.tls_cert is not None and cfg.tls_key is not None:
            self.certificate = ServerCertificate(cfg.tls_cert, cfg.tls_key)
        for addr, tls in [(a, False) for a in cfg.listen] + [(a, True) for a in cfg.listen_tls]:
            try:
                opened = await trio.open_tcp_listeners(addr.port, host=addr.host)
            except OSError as exc:
                for lst in listeners:
                    await lst.aclose()
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
            listeners += opened
            if tls:
                self._tls_listeners.update(opened)
        bound = [(lst.socket.getsockname()[1], lst in self._tls_listeners) for lst in listeners]
        self.ports = [port for port, tls in bound if not tls]
        self.tls_ports = [port for port, tls in bound if tls]
        if any(a.port == 0 for a in (*self.config.listen, *self.config.listen_tls)):
            ports = set(self.own.ports) | set(self.ports) | set(self.tls_ports)
            self.own = OwnNames(self.own.hosts, frozenset(ports))
        return listeners

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled or :meth:`drain` is called.

        ``task_status.started`` receives the bound ports.
        """
        listeners = await self.listen()
        try:
            async with trio.open_nursery() as conns:
                async with trio.open_nursery() as accept:
                    self._accept_scope = accept.cancel_scope
                    for lst in listeners:
                        accept.start_soon(self._accept_loop, lst, conns)
                    task_status.started(self.ports)
                # accepting stopped: drain
                for lst in listeners:
                    await lst.aclose()
                with trio.move_on_after(self.config.timeouts.shutdown_grace):
                    while self._conns:
                        await self._all_closed.wait()
                conns.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`serve` has drained and returned."""
        await self._stopped.wait()

    def reload_certificates(self) -> None:
        """Read the TLS listeners' certificate and key again (e.g. after a renewal);
        connections accepted from now on use them. No-op without TLS listeners.

        Raises:
          OSError: the files cannot be loaded; the previous certificate stays in use.
        """
        if self.certificate is not None:
            self.certificate.reload()
            log.info("reloaded TLS certificate %s", self.certificate.cert)

    def drain(self) -> None:
        """Stop accepting, close idle connections; running responses continue."""
        self.draining = True
        self._accept_scope.cancel()
        for c in list(self._conns):
            if c.idle_scope is not None:
                c.idle_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off rather than spin
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            if listener in self._tls_listeners and self.certificate is not None:
                conns.start_soon(self.handle_connection, self.certificate.wrap(stream))
            else:
                conns.start_soon(self.handle_connection, stream)

    # -- one connection ------------------------------------------------------------

    async def handle_connection(self, stream: _ClientStream) -> None:
        """Serve one client connection until it closes, errs or idles out."""
        try:
            peer_addr = _socket_stream(stream).socket.getpeername()
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
        except OSError:
            peer = "?"
        conn = _Conn(stream, peer, self.config.limits.max_request_head)
        self.open_connections += 1
        self._conns.add(conn)
        if self._all_closed.is_set():
            self._all_closed = trio.Event()
        try:
            if self.open_connections > self.config.limits.max_connections:
                data = conn.proto.error_response(503, "too many connections")
                if data:
                    with trio.move_on_after(1):
                        await _send_quiet(stream, data)
                return
            if conn.tls and not await self._handshake(conn):
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._request_loop, conn)
        except Exception:
            # a bug of ours: log it with its traceback, close this connection, keep serving
            log.exception("%s: internal error; connection closed", peer)
        finally:
            self.open_connections -= 1
            self._conns.discard(conn)
            if not self._conns:
                self._all_closed.set()
            try:
                if conn.linger:
                    await _linger(stream)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_LINGER_SECONDS):
                    await stream.aclose()  # TLS: close_notify; cut short, closes anyway

    async def _handshake(self, conn: _Conn) -> bool:
        """Complete the TLS handshake within ``request_head`` seconds; False if not."""
        assert isinstance(conn.stream, trio.SSLStream)
        with trio.move_on_after(self.config.timeouts.request_head):
            try:
                await conn.stream.do_handshake()
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("%s: TLS handshake failed: %s", conn.peer, exc.__cause__ or exc)
                return False
        log.info("%s: TLS handshake not complete in time: closing", conn.peer)
        return False

    async def _request_loop(self, conn: _Conn) -> None:
        proto = conn.proto
        while not self.draining:
            try:
                request = await self._read_head(conn)
            except BadRequest as exc:
                log.info("%s: bad request: %s", conn.peer, exc)
                data = proto.error_response(exc.status_hint, str(exc))
                if data:
                    await _send_final(conn.stream, data)
                    conn.linger = True
                return
            if request is None:
                return
            try:
                keep = await self._answer(conn, request)
                if keep and not proto.client_done:
                    async for _ in self._read_body(conn):
                        pass  # a body-less GET's end, or what a forward left unread
            except (_ClientGone, BadRequest, trio.TooSlowError):
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not keep or not proto.reusable:
                return
            proto.start_next_cycle()

    async def _read_head(self, conn: _Conn) -> Request | None:
        """The next request head; None when the client closed or idled out."""
        proto = conn.proto
        t = self.config.timeouts
        head_deadline = math.inf
        while True:
            event = proto.next_event()
            if isinstance(event, Request):
                return event
            if event is CLOSED:
                return None
            if event is not NEED_DATA:
                raise BadRequest("body bytes where a request head was expected")
            if proto.has_partial_request and head_deadline == math.inf:
                head_deadline = trio.current_time() + t.request_head
            deadline = (
                head_deadline if head_deadline != math.inf else trio.current_time() + t.keepalive
            )
            with trio.CancelScope(deadline=deadline) as scope:
                if head_deadline == math.inf:
                    conn.idle_scope = scope
                    if self.draining:
                        scope.cancel()
                try:
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                finally:
                    conn.idle_scope = None
            if scope.cancelled_caught:
                if head_deadline != math.inf and not self.draining:
                    log.info(
                        "%s: request head not complete in %.0fs: closing", conn.peer, t.request_head
                    )
                return None
            proto.receive_data(data)
            if data and head_deadline == math.inf:
                head_deadline = trio.current_time() + t.request_head

    async def _read_body(self, conn: _Conn) -> AsyncIterator[bytes]:
        proto = conn.proto
        while True:
            event = proto.next_event()
            if event is END_OF_BODY:
                return
            if isinstance(event, bytes):
                yield event
                continue
            if event is NEED_DATA:
                with trio.fail_after(self.config.timeouts.read):
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                proto.receive_data(data)
                continue
            raise BadRequest("request body ended early")

    # -- one request ---------------------------------------------------------------

    async def _answer(self, conn: _Conn, req: Request) -> bool:
        """Answer ``req``; True when the connection may carry another request."""
        started = time.monotonic()
        rec = AccessRecord(
            client=conn.peer,
            method=req.method,
            url=req.target,
            range=req.header("range") or "-",
            target=req.target,
            http_version=req.http_version,
            referer=req.header("referer") or "-",
            user_agent=req.header("user-agent") or "-",
        )
        peer = req.header(PEER_HEADER)
        try:
            if peer:  # a cluster peer asks: answer from here, never from another peer
                with answering_peer(peer):
                    keep = await self._dispatch(conn, req, rec)
            else:
                keep = await self._dispatch(conn, req, rec)
        except BadRequest as exc:
            log.info("%s: %s %s refused: %s", conn.peer, req.method, req.target[:200], exc)
            keep = await self._error(conn, rec, exc.status_hint, str(exc))
        except UpstreamError as exc:
            log.info("%s: %s %s: upstream failed: %s", conn.peer, req.method, rec.url, exc)
            keep = await self._error(conn, rec, exc.status_hint, f"upstream failed: {exc}")
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            trio.TooSlowError,
        ) as exc:
            log.debug("%s: connection ended while answering: %r", conn.peer, exc)
            rec.status = rec.status or 499
            rec.cache = rec.cache or "aborted"
            raise _ClientGone() from None
        except Exception:
            # a bug of ours: this request fails cleanly (500, or a cut connection when
            # the head went out), the node and its other requests go on
            self.cache.count_internal_error("http")
            log.exception("%s: %s %s: internal error", conn.peer, req.method, rec.url[:200])
            keep = await self._error(conn, rec, 500, "internal error")
        finally:
            rec.duration = time.monotonic() - started
            if peer:
                self.cache.upstream.peers.served_bytes += rec.bytes
            write_access(rec)
            self.metrics.record(rec.cache, rec.bytes, rec.duration, _host_of(rec.url), rec.url)
        return keep

    async def _error(self, conn: _Conn, rec: AccessRecord, status: int, message: str) -> bool:
        data = conn.proto.error_response(status, message)
        if data is None:  # a response was under way: the only honest signal is to close
            rec.cache = "aborted"
            raise _ClientGone()
        rec.status = status
        rec.cache = rec.cache or "error"
        await _send_final(conn.stream, data)
        conn.linger = True
        return False

    async def _dispatch(self, conn: _Conn, req: Request, rec: AccessRecord) -> bool:
        if req.method == "CONNECT":
            raise BadRequest("CONNECT is not supported: mcc is not a tunnel", status_hint=405)
        if req.method == "PURGE":
            return await self._purge(conn, req, rec)
        via = [v.split()[-1].lower() for v in req.header_list("via") if v.split()]
        if self.via_token in via:
            raise BadRequest(
                f"forwarding loop: request already passed {self.via_token}", status_hint=508
            )
        if req.method in ("GET", "HEAD") and req.target == "/health" and self._names_no_origin(req):
            rec.status, rec.cache = 204, "health"
            ids = [(NODE_HEADER, self.config.node_id)]
            if self.admin_port is not None:
                ids.append(("x-mcc-admin-port", str(self.admin_port)))
            await self._send_simple(conn, 204, ids, b"")
            return True
        route = route_request(
            req.target,
            req.header("host"),
            self.own,
            self.config.origin,
            self.cache.policy.upstream_scheme,
        )
        rec.url = route.url
        self.cache.resolve(route.url)  # 403 for hosts not allowed, before anything else
        if (
            req.method in ("GET", "HEAD")
            and not req.has_body
            and not any(req.header(h) for h in _CREDENTIAL_HEADERS)
        ):
            for attempt in range(2):
                try:
                    return await self._answer_cached(conn, req, route.url, rec)
                except NotCacheable:
                    break
                except VersionChanged:
                    if attempt or conn.proto.response_started:
                        raise
        return await self._forward(conn, req, route.url, rec)

    async def _purge(self, conn: _Conn, req: Request, rec: AccessRecord) -> bool:
        """PURGE, as Squid and Varnish answer it: drop the URL from the cache (200, or
        404 when it was not stored). Allowed from loopback or with the admin token;
        never forwarded upstream."""
        rec.cache = "purge"
        if not self._may_purge(conn.peer, req):
            raise BadRequest(
                "PURGE is allowed from loopback or with the admin token", status_hint=403
            )
        route = route_request(req.target, req.header("host"), self.own, self.config.origin)
        rec.url = route.url
        purged = await self.cache.purge(route.url)  # 403 for a host not allowed
        rec.status = 200 if purged else 404
        text = f"purged {route.url}\n" if purged else f"not stored: {route.url}\n"
        await self._send_simple(conn, rec.status, [("content-type", "text/plain")], text.encode())
        return True

    def _may_purge(self, peer: str, req: Request) -> bool:
        token = self.config.admin_token
        given = req.header("authorization") or ""
        if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        try:
            address = ipaddress.ip_address(peer.rsplit(":", 1)[0].strip("[]"))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback

    def _names_no_origin(self, req: Request) -> bool:
        try:
            route_request(req.target, req.header("host"), self.own, None)
        except BadRequest:
            return True
        return False

    async def _answer_cached(self, conn: _Conn, req: Request, url: str, rec: AccessRecord) -> bool:
        cache = self.cache
        first = _first_byte(req.header("range"))
        via = req.header_list("via")
        reader = object()  # this request, for telling its own fetches from joined ones
        found = await cache.lookup(url, first_byte=first, via=via, reader=reader)
        meta = found.meta
        ranges = parse_range(req.header("range"), meta.size, self.config.limits.max_ranges)
        if_range = req.header("if-range")
        if (
            ranges is not None
            and if_range is not None
            and not if_range_matches(if_range, meta.etag, meta.last_modified)
        ):
            ranges = None
        headers = self._object_headers(meta)
        if ranges is UNSATISFIABLE:
            rec.status, rec.cache = 416, "hit"
            headers.append(("content-range", f"bytes */{meta.size}"))
            await self._send_simple(conn, 416, headers, b"")
            return True
        if not isinstance(ranges, list):
            ranges = []
        spans = ranges or ([ByteRange(0, meta.size - 1)] if meta.size else [])
        rec.cache = self._cache_status(meta, spans)
        headers.append(("cache-status", self._cache_status_header(rec.cache, found.outcome)))
        slot = self._miss_slot(conn.peer) if rec.cache != "hit" else contextlib.nullcontext()
        with slot:
            return await self._send_cached(
                conn, req, meta, ranges, spans, headers, rec, via, reader
            )

    @contextlib.contextmanager
    def _miss_slot(self, peer: str) -> Iterator[None]:
        """Count one miss being answered for ``peer``'s address, within the cap.

        Raises:
          BadRequest: 503 when that address already has ``max_misses_per_client``.
        """
        client = peer.rsplit(":", 1)[0]
        if self._misses.get(client, 0) >= self.config.limits.max_misses_per_client:
            raise BadRequest(
                f"too many concurrent misses from {client}; retry shortly", status_hint=503
            )
        self._misses[client] = self._misses.get(client, 0) + 1
        try:
            yield
        finally:
            self._misses[client] -= 1
            if not self._misses[client]:
                del self._misses[client]

    async def _send_cached(
        self,
        conn: _Conn,
        req: Request,
        meta: ObjectMeta,
        ranges: list[ByteRange],
        spans: list[ByteRange],
        headers: list[tuple[str, str]],
        rec: AccessRecord,
        via: Sequence[str],
        reader: object,
    ) -> bool:
        head_only = req.method == "HEAD"
        if len(ranges) > 1:
            return await self._send_multipart(
                conn, meta, ranges, headers, head_only, rec, via, reader
            )
        status = 206 if ranges else 200
        if ranges:
            headers.append(("content-range", content_range(ranges[0], meta.size)))
        length = sum(r.length for r in spans)
        headers.append(("content-length", str(length)))
        rec.status = status
        head = conn.proto.response_head(status, headers)
        if head_only or not length:
            await self._send_all(conn, head + conn.proto.end())
            return True
        await self._send_head(conn, head)
        await self._send_span(conn, meta, spans[0], rec, via, reader)
        await self._send_all(conn, conn.proto.end())
        end = spans[0].end + 1
        if end % meta.block_size and end != meta.size:
            push(conn.sock)  # a range ending inside a block must not wait in the kernel
        return True

    def _cache_status(self, meta: ObjectMeta, spans: Sequence[ByteRange]) -> str:
        return self.cache.coverage(meta, [(r.start, r.end) for r in spans])

    def _cache_status_header(self, status: str, outcome: str) -> str:
        """RFC 9211 Cache-Status for a response built from the store."""
        node = self.config.node_id
        if outcome == "stale":
            return f"{node}; hit; detail=stale-if-error"
        if outcome == "revalidated":
            return f"{node}; fwd=stale; fwd-status=304" + ("" if status == "hit" else "; stored")
        if status == "hit":
            return f"{node}; hit"
        return f"{node}; fwd={status}; stored"

    def _object_headers(self, meta: ObjectMeta) -> list[tuple[str, str]]:
        headers = [("accept-ranges", "bytes")]
        if meta.content_type:
            headers.append(("content-type", meta.content_type))
        if meta.etag:
            headers.append(("etag", meta.etag))
        if meta.last_modified:
            headers.append(("last-modified", meta.last_modified))
        headers += [(k, v) for k, v in meta.headers if k not in ("date", "age")]
        headers.append(("age", str(int(age(meta, time.time())))))
        return headers

    async def _send_span(
        self,
        conn: _Conn,
        meta: ObjectMeta,
        span: ByteRange,
        rec: AccessRecord,
        via: Sequence[str],
        reader: object,
    ) -> None:
        segs = self.cache.segments(meta, span.start, span.end, via, reader)
        async with aclosing(segs) as segments:
            async for seg in segments:
                if isinstance(seg, FileSlice) and not conn.tls:
                    body = SendfileBody(seg.fd, seg.offset, seg.length)
                    for piece in conn.proto.body(body):
                        if piece is body:
                            with trio.fail_after(self._send_limit(seg.length)):
                                rec.bytes += await sendfile(conn.sock, body)
                        else:
                            await self._send_all(conn, piece)
                else:  # bytes in memory, or a stored block read for TLS (no sendfile)
                    pieces = (
                        file_pieces(seg.fd, seg.offset, seg.length, _SEND_PIECE)
                        if isinstance(seg, FileSlice)
                        else (seg[i : i + _SEND_PIECE] for i in range(0, len(seg), _SEND_PIECE))
                    )
                    for piece in pieces:
                        for framed in conn.proto.body(piece):
                            await self._send_all(conn, framed)
                        rec.bytes += len(piece)

    def _send_limit(self, nbytes: int) -> float:
        # send timeout per 256 KiB piece: a client slower than that floor is dropped
        return self.config.timeouts.send * max(1, nbytes / _SEND_PIECE)

    async def _send_multipart(
        self,
        conn: _Conn,
        meta: ObjectMeta,
        ranges: list[ByteRange],
        headers: list[tuple[str, str]],
        head_only: bool,
        rec: AccessRecord,
        via: Sequence[str],
        reader: object,
    ) -> bool:
        boundary = os.urandom(12).hex()
        ctype = meta.content_type or "application/octet-stream"
        part_heads = [
            (
                f"\r\n--{boundary}\r\nContent-Type: {ctype}\r\n"
                f"Content-Range: {content_range(r, meta.size)}\r\n\r\n"
            ).encode("latin-1")
            for r in ranges
        ]
        tail = f"\r\n--{boundary}--\r\n".encode("latin-1")
        length = sum(len(h) for h in part_heads) + sum(r.length for r in ranges) + len(tail)
        headers = [(k, v) for k, v in headers if k != "content-type"]
        headers += [
            ("content-type", f"multipart/byteranges; boundary={boundary}"),
            ("content-length", str(length)),
        ]
        rec.status = 206
        head = conn.proto.response_head(206, headers)
        if head_only:
            await self._send_all(conn, head + conn.proto.end())
            return True
        await self._send_head(conn, head)
        for part_head, r in zip(part_heads, ranges, strict=True):
            for framed in conn.proto.body(part_head):
                await self._send_all(conn, framed)
            await self._send_span(conn, meta, r, rec, via, reader)
        for framed in conn.proto.body(tail):
            await self._send_all(conn, framed)
        await self._send_all(conn, conn.proto.end())
        return True

    async def _forward(self, conn: _Conn, req: Request, url: str, rec: AccessRecord) -> bool:
        """Pass the request upstream unstored, streaming bodies both ways."""
        rec.cache = "pass"
        headers = [(k, v) for k, v in req.headers if k not in _REQUEST_HEADERS_FORWARDED_EXCLUDE]
        length = req.header("content-length")
        body = self._read_body(conn) if req.has_body else None
        async with self.cache.upstream.request(
            req.method,
            url,
            headers,
            body=body,
            body_length=int(length) if length and length.isdigit() else None,
        ) as resp:
            if not req.has_body:
                async for _ in self._read_body(conn):
                    pass
            out = [(k, v) for k, v in resp.headers if k not in ("content-length", "date", "server")]
            resp_len = resp.header("content-length")
            # HEAD answers carry the length of the body they omit; 204/304 carry none
            if resp_len is not None and (req.method == "HEAD" or resp.status not in (204, 304)):
                out.append(("content-length", resp_len))
            out.append(("cache-status", f"{self.config.node_id}; fwd=uri-miss"))
            rec.status = resp.status
            if req.method not in _SAFE_METHODS and resp.status < 400:
                await self.cache.purge(url)  # RFC 9111 s4.4: unsafe methods invalidate
            await self._send_all(conn, conn.proto.response_head(resp.status, out))
            async for chunk in resp.iter_body():
                for framed in conn.proto.body(chunk):
                    await self._send_all(conn, framed)
                rec.bytes += len(chunk)
            await self._send_all(conn, conn.proto.end())
        return True

    async def _send_simple(
        self, conn: _Conn, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        data = conn.proto.response_head(status, [*headers, ("content-length", str(len(body)))])
        if body:
            data += b"".join(conn.proto.body(body))
        data += conn.proto.end()
        await self._send_all(conn, data)

    async def _send_head(self, conn: _Conn, head: bytes) -> None:
        """A response head with a body to follow: MSG_MORE on plain sockets."""
        if conn.tls:
            await self._send_all(conn, head)
        else:
            await send_bytes(conn.sock, head, more=True)

    async def _send_all(self, conn: _Conn, data: bytes) -> None:
        if data:
            with trio.fail_after(self._send_limit(len(data))):
                await conn.stream.send_all(data)


def _socket_stream(stream: _ClientStream) -> trio.SocketStream:
    """The TCP stream under ``stream`` (itself, or what TLS runs over)."""
    return stream.transport_stream if isinstance(stream, trio.SSLStream) else stream


def _host_of(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return rest.split("/", 1)[0] or None


def _first_byte(range_header: str | None) -> int:
    """The first byte a Range header asks for (for discovery's block hint); 0 if unsure."""
    if not range_header or "=" not in range_header:
        return 0
    first = range_header.split("=", 1)[1].split(",")[0].strip()
    start = first.split("-")[0].strip()
    return int(start) if start.isdigit() and len(start) < 19 else 0


async def _send_final(stream: _ClientStream, data: bytes) -> None:
    """Send a last response on a connection about to close; a client gone is fine."""
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _send_quiet(stream: _ClientStream, data: bytes) -> None:
    """Send a final response and close gently (see :func:`_linger`)."""
    await _send_final(stream, data)
    await _linger(stream)


async def _linger(stream: _ClientStream) -> None:
    """Close gently: stop sending, and read (and drop) what the client still sends for
    a moment, so that unread request bytes do not make the kernel reset the connection
    before the client has read the last response."""
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            if isinstance(stream, trio.SocketStream):  # TLS has no half-close
                await stream.send_eof()
            drained = 0
            while drained < _LINGER_BYTES:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                drained += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _main(config: Config, load: Callable[[], Config] | None = None) -> int:
    async with open_cache(config) as cache:
        server = Server(config, cache)
        async with trio.open_nursery() as nursery:
            admin = AdminServer(cache, server.metrics, lambda: server.open_connections)
            try:
                ports = await nursery.start(server.serve)
                admin_port = server.admin_port = await nursery.start(admin.serve)
            except OSError as exc:
                sys.stderr.write(f"mcc: {exc.strerror}\n")
                nursery.cancel_scope.cancel()
                return 1
            stored = [cache.store.stored_bytes_on(i) for i in range(len(config.drives))]
            for line in banner(config, ports + server.tls_ports, admin_port, stored):
                log.info("%s", line)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("got SIGHUP: reopening logs and rereading the config")
                        config = reload(config, load, [cache, server])
                        continue
                    log.info(
                        "got %s: draining (grace %.0fs)",
                        signal.Signals(signum).name,
                        config.timeouts.shutdown_grace,
                    )
                    server.drain()
                    break
            # the server task ends once drained; the admin listener goes with it
            await server.wait_stopped()
            nursery.cancel_scope.cancel()
    return 0


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (as nginx's worker_rlimit_nofile):
    every client connection, upstream connection and blob being sent holds an fd."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def run_server(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status.

    Args:
      config: the config to start with.
      load: reads the config again on SIGHUP (the same file and flags); without it,
        SIGHUP only reopens the logs.

    Raises:
      CacheLocked: another process uses a cache directory.
    """
    configure_logging(config)
    _raise_fd_limit()
    try:
        return trio.run(_main, config, load)
    except OSError as exc:
        sys.stderr.write(f"mcc: cannot start: {exc}\n")
        return 1
