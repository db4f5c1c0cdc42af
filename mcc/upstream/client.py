"""An HTTP/1.1 client on h11 and trio: keep-alive pool, timeouts, parents in order.

Theory of operation: every upstream request goes to a *route*. The routes for a URL
are the healthy parents in configured order (each reached in forward-proxy form:
absolute URL as the request target), then the origin itself (directly, or through
``upstream_proxy``), unless ``origin_fallback`` is off. A parent that cannot be
reached, times out before answering, or answers 5xx is marked down for
``parent_backoff`` seconds and the next route is tried. Requests whose body cannot
be replayed only move on to the next route when nothing was sent.

A block fetch goes first to the peer that owns the block, when ``peers`` are set
(see :mod:`mcc.upstream.peers`); a peer that cannot be reached is marked down and the
block's next owner is asked, and when no peer helps, the routes above are used.

Connections are pooled per (host, port): a response read to its end on a keep-alive
connection returns the connection to the pool; anything else closes it. A pooled
connection the peer closed meanwhile fails before any response byte arrives; the
request is then retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urlsplit

import attrs
import h11
import trio

from ..config import Config
from ..errors import Refused, UpstreamError
from ..origins import is_internal_address, split_host_port
from .peers import PEER_HEADER, Peers, peer_request

__all__ = ["Route", "Upstream", "UpstreamResponse", "parse_http_url"]

log = logging.getLogger("mcc.upstream")

# Bytes asked of the socket per receive: large enough that a 1 MiB block takes
# a few dozen calls, small enough to bound the memory one connection holds.
_RECEIVE_SIZE = 256 * 1024
# RFC 9110 s5.4 leaves the limit to us; h11's default (16 KiB) refuses larger heads.
_MAX_RESPONSE_HEAD = 64 * 1024

# Peer answers passed on as they are; any other status moves on to the next route.
_PEER_ANSWERS = frozenset({200, 206, 301, 302, 303, 304, 307, 308, 404, 410, 412, 416})

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _body_length(response: UpstreamResponse) -> int:
    length = response.header("content-length")
    return int(length) if length is not None and length.isdigit() else 0


def parse_http_url(url: str) -> tuple[str, int, str]:
    """Split ``http://host[:port]/path?q`` into (host, port, path-and-query).

    Raises:
      ValueError: naming the URL when it is not a plain http URL.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// URL")
    host, port = split_host_port(parts.netloc, 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return host, port, target


@attrs.frozen
class Route:
    """One way upstream: where to connect and whether to use proxy (absolute) form."""

    name: str
    host: str
    port: int
    proxy_form: bool
    is_parent: bool = False
    is_peer: bool = False


class _Connection:
    def __init__(self, stream: trio.SocketStream, key: tuple[str, int]) -> None:
        self.stream = stream
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
        self.reused = False
        self.reusable_fresh = False  # a body read past h11 ended cleanly

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self, read_timeout: float) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(read_timeout):
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                self.h11.receive_data(data)
                continue
            assert not isinstance(event, type)  # PAUSED cannot happen: one request per cycle
            return event


class UpstreamResponse:
    """A response head from upstream plus its body, read with :meth:`receive`.

    Attributes:
      status: the status code.
      headers: (lower-case name, value) pairs, hop-by-hop headers removed.
      route: the route that answered.
    """

    def __init__(
        self,
        conn: _Connection,
        response: h11.Response,
        route: Route,
        timeout: float,
        counters: Upstream | None = None,
        method: str = "GET",
    ) -> None:
        self._conn = conn
        self._counters = counters
        self.route = route
        self.status = response.status_code
        self.reason = response.reason.decode("latin-1")
        self.headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.headers
            if k.decode("latin-1") not in _HOP_BY_HOP
        ]
        self._timeout = timeout
        self.complete = False
        # Bodies framed by Content-Length are read straight from the socket, past h11:
        # h11 would copy each piece twice more (its receive buffer, then the event).
        # h11 is replaced by a fresh connection object once the body is complete.
        self._direct_remaining: int | None = None
        names = {k.lower() for k, _ in response.headers}
        length: int | None = None
        for k, v in response.headers:
            if k.lower() == b"content-length":
                length = int(v)
        if (
            method != "HEAD"
            and self.status not in (204, 304)
            and b"transfer-encoding" not in names
            and length is not None
        ):
            self._direct_remaining = length
            self._pending = conn.h11.trailing_data[0]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def receive(self) -> bytes:
        """The next piece of the body; ``b""`` at its end.

        Raises:
          UpstreamError: the connection broke, timed out, or the framing was wrong
            (e.g. fewer bytes than Content-Length).
        """
        if self.complete:
            return b""
        if self._direct_remaining is not None:
            return await self._receive_direct()
        with _map_errors(self.route, "reading the body"):
            event = await self._conn.next_event(self._timeout)
        if isinstance(event, h11.Data):
            if self._counters is not None:
                self._counters.bytes_received += len(event.data)
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.complete = True
            return b""
        raise UpstreamError(f"{self.route.name}: unexpected {type(event).__name__} in body")

    @property
    def can_receive_into(self) -> bool:
        """True when :meth:`receive_into` may be used (a Content-Length body)."""
        return self._direct_remaining is not None

    async def receive_into(self, buf: memoryview) -> int:
        """Receive body bytes straight into ``buf``; returns how many (0 at the end).

        Raises:
          UpstreamError: as :meth:`receive`.
        """
        remaining = self._direct_remaining
        if self.complete or remaining is None:
            return 0
        if remaining == 0:
            self._finish_direct(b"")
            return 0
        want = min(len(buf), remaining)
        if self._pending:
            n = min(want, len(self._pending))
            buf[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        else:
            sock = self._conn.stream.socket
            with _map_errors(self.route, "reading the body"), trio.fail_after(self._timeout):
                n = await sock.recv_into(buf[:want])
            if not n:
                raise UpstreamError(
                    f"{self.route.name}: connection closed {remaining} bytes before the "
                    "end of the body"
                )
        remaining -= n
        self._direct_remaining = remaining
        if self._counters is not None:
            self._counters.bytes_received += n
        if remaining == 0:
            self._finish_direct(self._pending)
        return n

    async def _receive_direct(self) -> bytes:
        remaining = self._direct_remaining
        assert remaining is not None
        if remaining == 0:
            self._finish_direct(b"")
            return b""
        if self._pending:
            data, self._pending = self._pending[:remaining], self._pending[remaining:]
        else:
            with _map_errors(self.route, "reading the body"), trio.fail_after(self._timeout):
                data = await self._conn.stream.receive_some(min(remaining, _RECEIVE_SIZE))
            if not data:
                raise UpstreamError(
                    f"{self.route.name}: connection closed {remaining} bytes before the "
                    "end of the body"
                )
        remaining -= len(data)
        self._direct_remaining = remaining
        if self._counters is not None:
            self._counters.bytes_received += len(data)
        if remaining == 0:
            self._finish_direct(self._pending)
        return data

    def _finish_direct(self, leftover: bytes) -> None:
        self.complete = True
        self._direct_remaining = None
        # reusable only when nothing followed the body (we never pipeline upstream)
        self._conn.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE_HEAD)
        self._conn.reusable_fresh = not leftover

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Every remaining piece of the body."""
        while chunk := await self.receive():
            yield chunk


@contextmanager
def _map_errors(route: Route, doing: str) -> Iterator[None]:
    try:
        yield
    except trio.TooSlowError:
        raise UpstreamError(f"{route.name}: timed out {doing}", status_hint=504) from None
    except h11.ProtocolError as exc:
        raise UpstreamError(f"{route.name}: broken HTTP while {doing}: {exc}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UpstreamError(f"{route.name}: connection failed while {doing}: {exc}") from None


class Upstream:
    """Fetches from parents and origins for one mcc node.

    Args:
      config: the node's configuration (parents, proxy, timeouts, pool size, node id).
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._policy = config.origin_policy()
        self._idle: dict[tuple[str, int], list[_Connection]] = defaultdict(list)
        self._parents = [self._parent_route(u) for u in config.parents]
        self._down_until: dict[str, float] = {}
        self.peers = Peers(config)
        self.via = f"1.1 {config.node_id}"
        self.requests = 0
        self.bytes_received = 0
        self.outcomes: dict[tuple[str, str], int] = defaultdict(int)

    @staticmethod
    def _parent_route(url: str) -> Route:
        host, port, _ = parse_http_url(url if url.endswith("/") else url + "/")
        return Route(url, host, port, proxy_form=True, is_parent=True)

    def parent_health(self) -> dict[str, bool]:
        """Each parent URL -> True when it is currently considered up."""
        now = time.monotonic()
        return {r.name: self._down_until.get(r.name, 0) <= now for r in self._parents}

    def routes(self, url: str) -> list[Route]:
        """The routes to try for ``url``, in order."""
        now = time.monotonic()
        routes = [r for r in self._parents if self._down_until.get(r.name, 0) <= now]
        if not self._parents or self._config.origin_fallback:
            proxy = self._config.upstream_proxy
            if proxy is not None:
                routes.append(Route(f"proxy {proxy}", proxy.host, proxy.port, proxy_form=True))
            else:
                host, port, _ = parse_http_url(url)
                routes.append(Route(f"origin {host}:{port}", host, port, proxy_form=False))
        if not routes:  # every parent down and no fallback: try them anyway
            routes = list(self._parents)
        return routes

    def _routes_for(self, url: str, block: int | None) -> Iterator[Route]:
        """The routes for a request: for a block fetch, the block's owner among the
        peers first (the next owner when that one turns out dead, each tried once),
        then :meth:`routes`. A request answering a peer never goes to a peer."""
        if block is not None and self.peers.active and peer_request() is None:
            tried: set[str] = set()
            while (peer := self.peers.owner(url, block, frozenset(tried))) is not None:
                tried.add(peer.url)
                yield Route(peer.url, peer.host, peer.port, proxy_form=True, is_peer=True)
                if peer.up:  # alive but it could not help: the normal routes next
                    break
        yield from self.routes(url)

    def _route_failed(self, route: Route) -> None:
        """Count a failed attempt on ``route`` (and skip it for a while if a parent)."""
        self.outcomes[(route.name, "error")] += 1
        self._mark_down(route)

    def _mark_down(self, route: Route) -> None:
        if route.is_peer:
            self.peers.mark_down(route.name)
        elif route.is_parent:
            self._down_until[route.name] = time.monotonic() + self._config.timeouts.parent_backoff

    async def _connect(self, route: Route) -> _Connection:
        key = (route.host, route.port)
        idle = self._idle[key]
        while idle:
            conn = idle.pop()
            if conn.h11.our_state is h11.IDLE and conn.h11.their_state is h11.IDLE:
                conn.reused = True
                return conn
            await conn.stream.aclose()
        with _map_errors(route, "connecting"), trio.fail_after(self._config.timeouts.connect):
            if route.is_parent or route.proxy_form:
                stream = await trio.open_tcp_stream(route.host, route.port)
            else:
                stream = await self._connect_origin(route)
        return _Connection(stream, key)

    async def _connect_origin(self, route: Route) -> trio.SocketStream:
        """Resolve, refuse internal addresses unless the host is allowlisted by name
        (no SSRF through a public name that resolves inward), then connect to the
        checked address itself, so a second lookup cannot answer differently."""
        infos = await trio.socket.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self._policy.allows_explicitly(route.host, route.port):
            internal = [a for a in addresses if is_internal_address(a)]
            addresses = [a for a in addresses if a not in internal]
            if not addresses:
                raise Refused(
                    f"{route.host} resolves to internal address {internal[0]}; allow it by "
                    "name to fetch from it",
                    status_hint=403,
                )
        last: OSError | None = None
        for address in addresses:
            try:
                return await trio.open_tcp_stream(address, route.port)
            except OSError as exc:
                last = exc
        assert last is not None
        raise last

    async def _release(self, conn: _Connection, reusable: bool) -> None:
        done = conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
        if reusable and (done or conn.reusable_fresh):
            if done:
                conn.h11.start_next_cycle()
            conn.reusable_fresh = False
            idle = self._idle[conn.key]
            if len(idle) < self._config.limits.upstream_connections_per_host:
                idle.append(conn)
                return
        with trio.CancelScope(shield=True):
            await conn.stream.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        for conns in self._idle.values():
            for conn in conns:
                with trio.CancelScope(shield=True):
                    await conn.stream.aclose()
        self._idle.clear()

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        body: AsyncIterator[bytes] | None = None,
        body_length: int | None = None,
        *,
        block: int | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send one request upstream, trying routes in order; yields the response.

        Args:
          method: the request method.
          url: the absolute origin URL (``http://host[:port]/path?query``).
          headers: end-to-end request headers to send (Host, Via are added).
          body: the request body, streamed once (so only a connect failure moves on).
          body_length: its Content-Length, or None for chunked.
          block: the index of the block asked for, when it is a block fetch: it goes to
            the block's owner among the peers first (see :mod:`mcc.upstream.peers`).

        Raises:
          UpstreamError: no route answered.
        """
        host, port, target = parse_http_url(url)
        authority = host if port == 80 else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        base = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP | {"host", "via"}]
        via = [v for k, v in headers if k.lower() == "via"]
        base.append(("via", ", ".join([*via, self.via])))
        if body is not None and body_length is not None:
            base = [(k, v) for k, v in base if k.lower() != "content-length"]
            base.append(("content-length", str(body_length)))
        elif body is not None:
            base.append(("transfer-encoding", "chunked"))
        last_error: UpstreamError | None = None
        for route in self._routes_for(url, block if body is None else None):
            request_target = f"http://{authority}{target}" if route.proxy_form else target
            marks = [(PEER_HEADER, self._config.node_id)] if route.is_peer else []
            h11_request = h11.Request(
                method=method, target=request_target, headers=[("host", authority), *base, *marks]
            )
            for fresh_try in range(2):
                try:
                    conn = await self._connect(route)
                except UpstreamError as exc:
                    last_error = exc
                    self._route_failed(route)
                    break
                sent_body = False
                try:
                    with _map_errors(route, "sending the request"):
                        await conn.send(h11_request)
                        if body is not None:
                            sent_body = True
                            async for chunk in body:
                                await conn.send(h11.Data(data=chunk))
                        await conn.send(h11.EndOfMessage())
                    with _map_errors(route, "waiting for the response"):
                        event = await conn.next_event(self._config.timeouts.read)
                        while isinstance(event, h11.InformationalResponse):
                            event = await conn.next_event(self._config.timeouts.read)
                    if not isinstance(event, h11.Response):
                        raise UpstreamError(f"{route.name}: closed without a response")
                except UpstreamError as exc:
                    await self._release(conn, reusable=False)
                    if conn.reused and fresh_try == 0 and not sent_body:
                        continue  # a stale pooled connection: once more on a fresh one
                    last_error = exc
                    self._route_failed(route)
                    if sent_body:
                        raise
                    break
                except BaseException:
                    await self._release(conn, reusable=False)
                    raise
                self.requests += 1
                outcome = "5xx" if event.status_code >= 500 else "ok"
                self.outcomes[(route.name, outcome)] += 1
                response = UpstreamResponse(
                    conn, event, route, self._config.timeouts.read, self, method
                )
                if route.is_parent and response.status >= 500 and body is None:
                    self._mark_down(route)
                    last_error = UpstreamError(f"{route.name}: answered {response.status}")
                    await self._release(conn, reusable=False)
                    break
                if route.is_peer and response.status not in _PEER_ANSWERS:
                    # the peer is alive but could not help (its upstream failed, it is
                    # busy, configured differently): this request goes on without it
                    log.info("peer %s answered %d: next route", route.name, response.status)
                    last_error = UpstreamError(f"{route.name}: answered {response.status}")
                    await self._release(conn, reusable=False)
                    break
                try:
                    yield response
                finally:
                    if route.is_peer and response.complete:
                        self.peers.received_bytes += _body_length(response)
                    await self._release(conn, reusable=response.complete)
                return
        assert last_error is not None
        raise last_error
