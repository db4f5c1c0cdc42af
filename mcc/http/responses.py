"""Response writers: stored blocks with sendfile, blocks in flight as they arrive,
multipart ranges, pass-through to upstream, PURGE, and errors.

Theory of operation: :class:`Responses` answers one routed request on one
connection (:class:`Conn`); the connection loop (:mod:`mcc.http.server`) reads heads
and calls it. A response whose head went out can only end honestly: complete, or
with the connection cut (:class:`ClientGone`). Every write is bounded by the send
timeout per 256 KiB piece, so a client slower than that floor is dropped. Byte
arithmetic over blocks stays in the engine: this module asks it which spans are
stored (:meth:`~mcc.engine.engine.Cache.coverage`) and reads segments.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing

import trio

from ..config import Config
from ..engine.engine import Cache, FileSlice
from ..errors import BadRequest
from ..headers import is_digits
from ..ops.accesslog import AccessRecord
from ..ops.outcome import Outcome, cache_status, served_outcome
from ..policy import age, end_to_end, invalidated, replayed_fields
from ..store.records import ObjectMeta
from .heads import HeadTemplates
from .protocol import END_OF_BODY, NEED_DATA, Request, ServerProtocol
from .ranges import (
    UNSATISFIABLE,
    ByteRange,
    content_range,
    first_byte,
    if_range_matches,
    last_byte,
    parse_range,
)
from .routing import OwnNames, route_request
from .sendfile import (  # the closing helpers are re-exported for the server
    ClientStream,
    SendfileBody,
    linger,
    push,
    raw_socket,
    send_bytes,
    send_final,
    send_quiet,
    sendfile,
    socket_stream,
)
from .tls import file_pieces

__all__ = [
    "ClientGone",
    "ClientStream",
    "Conn",
    "Responses",
    "linger",
    "send_final",
    "send_quiet",
    "socket_stream",
]

log = logging.getLogger("mcc.http")

RECEIVE_SIZE = 64 * 1024
# Bytes per send for in-memory chunks; a response is written in pieces this size so
# the send timeout bounds the time any one piece may take (slow-reader floor).
_SEND_PIECE = 256 * 1024
_REQUEST_HEADERS_FORWARDED_EXCLUDE = frozenset(
    {"host", "connection", "keep-alive", "te", "upgrade", "proxy-connection", "proxy-authorization"}
)


class ClientGone(Exception):
    """The client stopped reading or closed; the connection is finished."""


class Conn:
    """Per-connection state shared by the request loop and the drain logic."""

    def __init__(self, stream: ClientStream, peer: str, max_head: int) -> None:
        self.stream = stream
        self.tls = isinstance(stream, trio.SSLStream)
        self.sock = socket_stream(stream).socket
        # plain sockets: reads and writes without trio's schedule points (sendfile.py)
        self.raw = None if self.tls else raw_socket(self.sock)
        self.peer = peer
        self.proto = ServerProtocol(max_head)
        self.idle_scope: trio.CancelScope | None = None
        self.linger = False  # an error response went out: close gently


class Responses:
    """Writes the responses of one server (see the module).

    Args:
      config: the node's configuration (replaced on reload).
      cache: the engine.
    """

    config: Config
    cache: Cache
    own: OwnNames

    def __init__(self) -> None:
        self._misses: dict[str, int] = {}  # client address -> misses being answered
        self.heads = HeadTemplates()

    async def _read_body(self, conn: Conn) -> AsyncIterator[bytes]:
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
                    data = await conn.stream.receive_some(RECEIVE_SIZE)
                proto.receive_data(data)
                continue
            raise BadRequest("request body ended early")

    # -- one request ---------------------------------------------------------------

    async def _answer_cached(self, conn: Conn, req: Request, url: str, rec: AccessRecord) -> bool:
        cache = self.cache
        first = first_byte(req.header("range"))
        via = req.header_list("via")
        reader = object()  # this request, for telling its own fetches from joined ones
        last = last_byte(req.header("range"))
        found = await cache.lookup(
            url, first_byte=first, last_byte=last, via=via, reader=reader, request=req.headers
        )
        meta = found.meta
        ranges = parse_range(req.header("range"), meta.size, self.config.limits.max_ranges)
        if_range = req.header("if-range")
        if (
            ranges is not None
            and if_range is not None
            and not if_range_matches(if_range, meta.etag, meta.last_modified)
        ):
            ranges = None
        rec.fwd_status = found.upstream_status
        if ranges is UNSATISFIABLE:  # answered from the record alone: no block needed
            rec.status, rec.cache = 416, served_outcome(found.outcome, "hit").value
            headers = self._object_headers(meta)
            headers.append(("content-range", f"bytes */{meta.size}"))
            self._add_cache_status(headers, rec)
            await self._send_simple(conn, 416, headers, b"")
            return True
        if not isinstance(ranges, list):
            ranges = []
        spans = ranges or ([ByteRange(0, meta.size - 1)] if meta.size else [])
        coverage = self.cache.coverage(meta, [(r.start, r.end) for r in spans])
        rec.cache = served_outcome(found.outcome, coverage).value
        slot = self._miss_slot(conn.peer) if coverage != "hit" else contextlib.nullcontext()
        with slot:
            return await self._send_cached(
                conn, req, meta, ranges, spans, coverage == "hit", rec, via, reader
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
        conn: Conn,
        req: Request,
        meta: ObjectMeta,
        ranges: list[ByteRange],
        spans: list[ByteRange],
        stored: bool,
        rec: AccessRecord,
        via: Sequence[str],
        reader: object,
    ) -> bool:
        head_only = req.method == "HEAD"
        if len(ranges) > 1:
            headers = self._object_headers(meta)
            self._add_cache_status(headers, rec)
            return await self._send_multipart(
                conn, meta, ranges, headers, head_only, rec, via, reader
            )
        status = rec.status = 206 if ranges else 200
        crange = content_range(ranges[0], meta.size) if ranges else None
        length = sum(r.length for r in spans)

        def head() -> bytes:  # made when the first byte is ready (see _send_span)
            return self._single_head(conn, meta, status, crange, length, stored, rec)

        if head_only or not length:
            await self._send_all(conn, head() + conn.proto.end())
            return True
        await self._send_span(conn, meta, spans[0], rec, via, reader, head=head)
        await self._send_all(conn, conn.proto.end())
        end = spans[0].end + 1
        if end % meta.block_size and end != meta.size:
            push(conn.sock)  # a range ending inside a block must not wait in the kernel
        return True

    def _single_head(
        self, conn: Conn, meta: ObjectMeta, status: int, crange: str | None, length: int,
        stored: bool, rec: AccessRecord,
    ) -> bytes:  # fmt: skip
        """A 200/206 head: from the object's template when every block is stored
        (:mod:`mcc.http.heads`), else (or when h11 must write it) built through h11."""
        value = cache_status(self.config.node_id, rec.cache, rec.fwd_status)
        if stored:
            head = self.heads.hit_head(
                conn.proto, meta, status, cache_status=value, content_range=crange,
                length=length, object_headers=self._object_headers,
            )  # fmt: skip
            if head is not None:
                return head
        headers = self._object_headers(meta)
        headers += [("cache-status", value)] if value is not None else []
        headers += [("content-range", crange)] if crange is not None else []
        return conn.proto.response_head(status, [*headers, ("content-length", str(length))])

    def _add_cache_status(self, headers: list[tuple[str, str]], rec: AccessRecord) -> None:
        """Cache-Status (RFC 9211), derived from the request's outcome record."""
        value = cache_status(self.config.node_id, rec.cache, rec.fwd_status)
        if value is not None:
            headers.append(("cache-status", value))

    def _object_headers(self, meta: ObjectMeta) -> list[tuple[str, str]]:
        """The stored fields replayed (the origin's Date kept), and Age (RFC 9111 s4.2.3)."""
        headers = [("accept-ranges", "bytes")]
        if meta.content_type:
            headers.append(("content-type", meta.content_type))
        if meta.etag:
            headers.append(("etag", meta.etag))
        if meta.last_modified:
            headers.append(("last-modified", meta.last_modified))
        headers += replayed_fields(meta)
        headers.append(("age", str(int(age(meta, time.time())))))
        return headers

    async def _send_span(
        self,
        conn: Conn,
        meta: ObjectMeta,
        span: ByteRange,
        rec: AccessRecord,
        via: Sequence[str],
        reader: object,
        head: Callable[[], bytes] | None = None,  # made and sent with the first byte
    ) -> None:
        segs = self.cache.segments(meta, span.start, span.end, via, reader)
        async with aclosing(segs) as segments:
            async for seg in segments:
                if head is not None:  # so a failure before the first byte gets 502/504
                    await self._send_head(conn, head())
                    head = None
                if isinstance(seg, FileSlice) and not conn.tls:
                    body = SendfileBody(seg.fd, seg.offset, seg.length)
                    for piece in conn.proto.body(body):
                        if piece is body:
                            limit = self._send_limit(seg.length)  # time for this slice
                            rec.bytes += await sendfile(conn.sock, body, limit)
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
        conn: Conn,
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

    async def _forward(self, conn: Conn, req: Request, url: str, rec: AccessRecord) -> bool:
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
            content_length=int(length) if length and is_digits(length) else None,
        ) as resp:
            if not req.has_body:
                async for _ in self._read_body(conn):
                    pass
            out = [(k, v) for k, v in end_to_end(resp.headers) if k != "content-length"]
            resp_len = resp.header("content-length")
            # HEAD answers carry the length of the body they omit; 204/304 carry none
            if resp_len is not None and (req.method == "HEAD" or resp.status not in (204, 304)):
                out.append(("content-length", resp_len))
            rec.status = rec.fwd_status = resp.status
            self._add_cache_status(out, rec)
            for stale in invalidated(req.method, url, resp.status, resp.headers):
                with contextlib.suppress(BadRequest):  # a Location that is no URL of ours
                    await self.cache.purge(stale)  # RFC 9111 s4.4: unsafe methods invalidate
            await self._send_all(conn, conn.proto.response_head(resp.status, out))
            async for chunk in resp.iter_body():
                for framed in conn.proto.body(chunk):
                    await self._send_all(conn, framed)
                rec.bytes += len(chunk)
            await self._send_all(conn, conn.proto.end())
        return True

    async def _send_simple(
        self, conn: Conn, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        data = conn.proto.response_head(status, [*headers, ("content-length", str(len(body)))])
        if body:
            data += b"".join(conn.proto.body(body))
        data += conn.proto.end()
        await self._send_all(conn, data)

    async def _send_head(self, conn: Conn, head: bytes) -> None:
        """A response head with a body to follow: MSG_MORE on plain sockets."""
        if conn.tls:
            await self._send_all(conn, head)
        else:
            limit = self._send_limit(len(head))
            await send_bytes(conn.sock, head, more=True, raw=conn.raw, limit=limit)
            await trio.lowlevel.cancel_shielded_checkpoint()  # a response's one yield

    async def _send_all(self, conn: Conn, data: bytes) -> None:
        if not data:
            return
        limit = self._send_limit(len(data))
        if conn.raw is not None:
            await send_bytes(conn.sock, data, raw=conn.raw, limit=limit)
            return
        with trio.fail_after(limit):
            await conn.stream.send_all(data)

    async def _error(self, conn: Conn, rec: AccessRecord, status: int, message: str) -> bool:
        data = conn.proto.error_response(status, message)
        if data is None:  # a response was under way: the only honest signal is to close
            rec.cache = "aborted"
            raise ClientGone()
        rec.status = status
        rec.cache = Outcome.ERROR.value  # whatever was planned, the answer is an error
        await send_final(conn.stream, data)
        conn.linger = True
        return False

    async def _purge(self, conn: Conn, req: Request, rec: AccessRecord) -> bool:
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
