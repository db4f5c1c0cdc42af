"""An HTTP/1.1 client on h11 and trio: keep-alive pool, timeouts, parents in order.

Theory of operation: every upstream request goes to a *route*. The routes for a URL
are the healthy parents in configured order (each reached in forward-proxy form:
absolute URL as the request target), then the origin itself (directly, or through
``upstream_proxy``), unless ``origin_fallback`` is off. A parent that cannot be
reached, times out before answering, or answers 5xx is marked down for
``parent_backoff`` seconds and the next route is tried. Requests whose body cannot
be replayed only move on to the next route when nothing was sent.

Over https (an ``https://`` URL, or an ``https://`` parent) the connection is wrapped
in TLS that verifies the peer (see :mod:`mcc.upstream.tls`); an https object reached
through ``upstream_proxy`` goes through a CONNECT tunnel, so the proxy never sees it
in the clear and mcc still verifies the origin. A certificate that does not verify
fails the route with 502: nothing is ever fetched unverified.

A block fetch goes first to the peer that owns the block, when ``peers`` are set
(see :mod:`mcc.upstream.peers`); a peer that cannot be reached is marked down and the
block's next owner is asked, and when no peer helps, the routes above are used.

Connections are pooled per (host, port, TLS name, tunnel): a response read to its end
on a keep-alive connection (HTTP/1.1, no ``Connection: close``) returns the connection
to the pool; anything else closes it. A pooled connection idle for longer than
``timeouts.pool_idle`` is closed rather than reused (origins close idle connections
themselves, and a close that crosses our request loses it). A pooled connection the
peer closed meanwhile fails before any response byte arrives; the request is then
retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import asynccontextmanager

import h11
import trio

from ..config import Config
from ..errors import Refused, UpstreamError
from ..origins import is_internal_address
from .connection import (
    HOP_BY_HOP,
    Connection,
    Route,
    UpstreamResponse,
    body_length,
    map_errors,
    quiet,
    wire_headers,
)
from .peers import PEER_HEADER, Peers, peer_request
from .progress import ProgressRules, Stalled
from .tls import client_context
from .urls import DEFAULT_PORTS, parse_http_url, parse_url, quote_target

__all__ = [
    "DEFAULT_PORTS",
    "Route",
    "Upstream",
    "UpstreamResponse",
    "parse_http_url",
    "parse_url",
    "quote_target",
]

log = logging.getLogger("mcc.upstream")

# Peer answers passed on as they are; any other status moves on to the next route.
_PEER_ANSWERS = frozenset({200, 206, 301, 302, 303, 304, 307, 308, 404, 410, 412, 416})


class Upstream:
    """Fetches from parents and origins for one mcc node.

    Args:
      config: the node's configuration (parents, proxy, timeouts, pool size, node id).
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.policy = config.origin_policy()
        self._idle: dict[tuple[str, int, str | None, str | None], list[Connection]] = defaultdict(
            list
        )
        self._tls: ssl.SSLContext | None = None  # made on first use (reads the CA store)
        if config.upstream_ca_file is not None:  # a bad file fails the start, not a request
            self.tls_context()
        self._parents = [self._parent_route(u) for u in config.parents]
        self._down_until: dict[str, float] = {}
        self.peers = Peers(config)
        self.via = f"1.1 {config.node_id}"
        self.requests = 0
        self.bytes_received = 0
        self.outcomes: dict[tuple[str, str], int] = defaultdict(int)

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config for requests from now on (parents, proxy, timeouts,
        pool size); requests under way finish as they started. A parent kept from
        the old list keeps its up/down state."""
        self._config = config
        self.policy = config.origin_policy()
        self._parents = [self._parent_route(u) for u in config.parents]
        names = {r.name for r in self._parents}
        self._down_until = {k: v for k, v in self._down_until.items() if k in names}

    @staticmethod
    def _parent_route(url: str) -> Route:
        scheme, host, port, _ = parse_url(url if url.endswith("/") else url + "/")
        tls_name = host if scheme == "https" else None
        return Route(url, host, port, proxy_form=True, is_parent=True, tls_name=tls_name)

    @property
    def progress_rules(self) -> ProgressRules:
        """The progress guard's limits (``[timeouts]`` stall, min_rate, min_rate_window)."""
        t = self._config.timeouts
        return ProgressRules(t.stall, t.min_rate, t.min_rate_window)

    def tls_context(self) -> ssl.SSLContext:
        """The verifying client context (built once, on first use)."""
        if self._tls is None:
            self._tls = client_context(self._config.upstream_ca_file)
        return self._tls

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
            scheme, host, port, _ = parse_url(url)
            tls_name = host if scheme == "https" else None
            if proxy is not None and tls_name is not None:  # https: CONNECT, then TLS
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                routes.append(
                    Route(
                        f"proxy {proxy} to {shown}",
                        proxy.host,
                        proxy.port,
                        proxy_form=False,
                        tls_name=tls_name,
                        tunnel=shown,
                    )
                )
            elif proxy is not None:
                routes.append(Route(f"proxy {proxy}", proxy.host, proxy.port, proxy_form=True))
            else:
                name = f"origin {scheme}://{host}:{port}" if tls_name else f"origin {host}:{port}"
                routes.append(Route(name, host, port, proxy_form=False, tls_name=tls_name))
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

    async def _connect(self, route: Route) -> Connection:
        key = route.pool_key
        idle = self._idle[key]
        oldest = time.monotonic() - self._config.timeouts.pool_idle
        while idle:
            conn = idle.pop()
            if (
                conn.idle_since >= oldest
                and conn.h11.our_state is h11.IDLE
                and conn.h11.their_state is h11.IDLE
                and quiet(conn.stream)
            ):
                conn.reused = True
                return conn
            await conn.stream.aclose()
        with map_errors(route, "connecting"), trio.fail_after(self._config.timeouts.connect):
            if route.is_parent or route.proxy_form or route.tunnel:
                stream = await trio.open_tcp_stream(route.host, route.port)
            else:
                stream = await self._connect_origin(route)
            if route.tls_name is None:
                return Connection(stream, key)
            try:
                if route.tunnel:
                    await _open_tunnel(stream, route.tunnel, self.via)
                tls = trio.SSLStream(
                    stream,
                    self.tls_context(),
                    server_hostname=route.tls_name,
                    https_compatible=True,
                )
                await tls.do_handshake()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        return Connection(tls, key)

    async def _connect_origin(self, route: Route) -> trio.SocketStream:
        """Resolve, refuse internal addresses unless the host is allowlisted by name
        (no SSRF through a public name that resolves inward), then connect to the
        checked address itself, so a second lookup cannot answer differently."""
        try:
            infos = await trio.socket.getaddrinfo(route.host, route.port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:  # the idna codec refuses the name
            raise UpstreamError(f"{route.host!r} cannot be resolved: {exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self.policy.allows_explicitly(route.host, route.port):
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

    async def _release(self, conn: Connection, reusable: bool) -> None:
        done = conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
        if done and conn.h11.trailing_data[0]:
            reusable = False  # bytes nobody asked for (we never pipeline upstream)
        if reusable and (done or conn.reusable_fresh) and quiet(conn.stream):
            if done:
                conn.h11.start_next_cycle()
            conn.reusable_fresh = False
            idle = self._idle[conn.key]
            if len(idle) < self._config.limits.upstream_connections_per_host:
                conn.idle_since = time.monotonic()
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
        content_length: int | None = None,
        *,
        block: int | None = None,
        avoid: Collection[str] = (),
        stall: float | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send one request upstream, trying routes in order; yields the response.

        Args:
          method: the request method.
          url: the absolute origin URL (``http[s]://host[:port]/path?query``).
          headers: end-to-end request headers to send (Host, Via are added).
          body: the request body, streamed once (so only a connect failure moves on).
          content_length: its Content-Length, or None for chunked.
          block: the index of the block asked for, when it is a block fetch: it goes to
            the block's owner among the peers first (see :mod:`mcc.upstream.peers`).
          avoid: names of routes not to try (abandoned earlier as stalled).
          stall: when set, a response head must come within this many seconds (or the
            read timeout, if shorter); a route that misses it is abandoned.

        Raises:
          UpstreamError: no route answered.
          Stalled: the last route tried sent no head in time, or every route is avoided.
        """
        scheme, host, port, target = parse_url(url)
        default = port == DEFAULT_PORTS[scheme]
        authority = host if default else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if default else f"[{host}]:{port}"
        base = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | {"host", "via"}]
        via = [v for k, v in headers if k.lower() == "via"]
        base.append(("via", ", ".join([*via, self.via])))
        if body is not None and content_length is not None:
            base = [(k, v) for k, v in base if k.lower() != "content-length"]
            base.append(("content-length", str(content_length)))
        elif body is not None:
            base.append(("transfer-encoding", "chunked"))
        last_error: UpstreamError | None = None
        wire = wire_headers([("host", authority), *base])
        head_timeout = self._config.timeouts.read
        if stall is not None:
            head_timeout = min(head_timeout, stall)
        for route in self._routes_for(url, block if body is None else None):
            if route.name in avoid:
                continue
            request_target = f"{scheme}://{authority}{target}" if route.proxy_form else target
            marks = wire_headers([(PEER_HEADER, self._config.node_id)]) if route.is_peer else []
            try:
                h11_request = h11.Request(
                    method=method.encode("ascii"),
                    target=request_target.encode("ascii"),
                    headers=[*wire, *marks],
                )
            except (h11.LocalProtocolError, UnicodeError) as exc:
                raise UpstreamError(f"cannot send {method} {url[:200]!r}: {exc}") from None
            for fresh_try in range(2):
                try:
                    conn = await self._connect(route)
                except UpstreamError as exc:
                    last_error = exc
                    self._route_failed(route)
                    break
                sent_body = False
                try:
                    with map_errors(route, "sending the request"):
                        await conn.send(h11_request)
                        if body is not None:
                            sent_body = True
                            async for chunk in body:
                                await conn.send(h11.Data(data=chunk))
                        await conn.send(h11.EndOfMessage())
                    with map_errors(route, "waiting for the response"):
                        try:
                            event = await conn.next_event(head_timeout)
                            while isinstance(event, h11.InformationalResponse):
                                event = await conn.next_event(head_timeout)
                        except trio.TooSlowError:
                            if stall is None:
                                raise
                            raise Stalled(
                                f"{route.name}: no response within {head_timeout:g} s; abandoned",
                                route=route.name,
                            ) from None
                    if not isinstance(event, h11.Response):
                        raise UpstreamError(f"{route.name}: closed without a response")
                    if event.status_code > 599:  # RFC 9110 s15: three digits, 1xx-5xx
                        raise UpstreamError(f"{route.name}: invalid status {event.status_code}")
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
                        self.peers.received_bytes += body_length(response)
                    # after a HEAD, a body the origin sends anyway may still be on its
                    # way: such a connection is not reused (HEAD is rare upstream)
                    reuse = response.complete and method != "HEAD"
                    await self._release(conn, reusable=reuse)
                return
        if last_error is None:
            raise Stalled(f"{url[:200]}: every route was abandoned as stalled")
        raise last_error


# The longest CONNECT answer head read from an upstream proxy (RFC 9110 s9.3.6).
_MAX_CONNECT_HEAD = 16 * 1024


async def _open_tunnel(stream: trio.SocketStream, authority: str, via: str) -> None:
    """Ask the proxy on ``stream`` for a tunnel to ``authority`` (CONNECT).

    Raises:
      UpstreamError: the proxy refused (its status is named) or answered garbage.
    """
    request = (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nVia: {via}\r\n\r\n").encode(
        "ascii"
    )
    await stream.send_all(request)
    head = b""
    while b"\r\n\r\n" not in head:  # read byte-exact: TLS starts right after the head
        chunk = await stream.receive_some(1)
        if not chunk or len(head) > _MAX_CONNECT_HEAD:
            raise UpstreamError(f"proxy closed or misbehaved answering CONNECT {authority}")
        head += chunk
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].startswith("2"):
        raise UpstreamError(f"proxy refused CONNECT {authority}: {status_line[:100]}")
