"""The connection loop: listeners, one nursery per connection, requests routed.

Theory of operation: :class:`Server` accepts connections on every ``listen``
address. Each connection runs :meth:`Server.handle_connection` inside its own
nursery: the request loop reads a head (``request_head`` timeout once bytes start
arriving, ``keepalive`` timeout while idle), routes it, answers it, and loops while
keep-alive holds. Pipelined requests wait in h11's buffer and are answered in order.

GET and HEAD of cacheable objects are answered from the engine: stored blocks go out
with ``os.sendfile``, blocks in flight as they arrive. Anything else (other methods,
requests with credentials, answers upstream marks private) is forwarded unstored.
The writers of those responses live in :mod:`mcc.http.responses`; the process
around it (signals, admin API) in :mod:`mcc.http.run`.

``listen_tls`` addresses serve the same over TLS (see :mod:`mcc.http.tls`): the
handshake is awaited first, and stored blocks go out by pread through the SSL stream
instead of sendfile.

On SIGTERM or SIGINT the listeners close, idle keep-alive connections are closed,
and responses in progress get ``shutdown_grace`` seconds to finish. On SIGHUP the
logs are reopened and the config reread (see :mod:`mcc.ops.daemon`): new requests
see the new config, responses in progress finish as they started.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from ..config import Config
from ..engine.engine import Cache
from ..errors import BadRequest, NotCacheable, UpstreamError, VersionChanged
from ..ops.accesslog import AccessRecord, run_access_flusher, write_access
from ..ops.metrics import Metrics
from ..ops.sockets import open_tcp_listeners
from ..upstream.peers import NODE_HEADER, PEER_HEADER, answering_peer
from .protocol import CLOSED, END_OF_BODY, NEED_DATA, Request
from .responses import (
    RECEIVE_SIZE,
    ClientGone,
    ClientStream,
    Conn,
    Responses,
    linger,
    send_final,
    send_quiet,
    socket_stream,
)
from .routing import OwnNames, RouteMemo, host_of, route_request
from .sendfile import receive_nowait
from .tls import ServerCertificate

__all__ = ["Server"]

log = logging.getLogger("mcc.http")

# After an error response: how long, and how many bytes, to keep reading before close
# (nginx's lingering_close does the same, with 5 s).
_LINGER_SECONDS = 2.0
_CREDENTIAL_HEADERS = ("authorization", "cookie")


class Server(Responses):
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
        super().__init__()
        self.open_connections = 0
        self.draining = False
        self._conns: set[Conn] = set()
        self._all_closed = trio.Event()
        self._stopped = trio.Event()
        self.ports: list[int] = []
        self.tls_ports: list[int] = []
        self.certificate: ServerCertificate | None = None
        self._tls_listeners: set[trio.SocketListener] = set()
        self.admin_port: int | None = None  # named in /health answers, for cluster views
        self.routes = RouteMemo()  # a hit's route, without parsing its target again

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded config for new requests (listen and node_id stay as they were);
        the TLS certificate is read again (a renewed one, or new paths)."""
        self.config = config
        self.heads.clear()  # hit heads are formatted afresh under the new config
        self.routes.clear()  # as routes: origin and allowlist (schemes) may change
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
                opened = await open_tcp_listeners(addr.port, host=addr.host)
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
            self.routes.clear()
        return listeners

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled or :meth:`drain` is called.

        ``task_status.started`` receives the bound ports.
        """
        listeners = await self.listen()
        try:
            async with trio.open_nursery() as conns:
                conns.start_soon(self.metrics.loop_lag.run)  # these two end with the
                conns.start_soon(run_access_flusher)  # connections (the last lines written)
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

    async def handle_connection(self, stream: ClientStream) -> None:
        """Serve one client connection until it closes, errs or idles out."""
        try:
            peer_addr = socket_stream(stream).socket.getpeername()
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
        except OSError:
            peer = "?"
        conn = Conn(stream, peer, self.config.limits.max_request_head)
        self.open_connections += 1
        self._conns.add(conn)
        if self._all_closed.is_set():
            self._all_closed = trio.Event()
        try:
            if self.open_connections > self.config.limits.max_connections:
                data = conn.proto.error_response(503, "too many connections")
                if data:
                    with trio.move_on_after(1):
                        await send_quiet(stream, data)
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
                    await linger(stream)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_LINGER_SECONDS):
                    await stream.aclose()  # TLS: close_notify; cut short, closes anyway

    async def _handshake(self, conn: Conn) -> bool:
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

    async def _request_loop(self, conn: Conn) -> None:
        proto = conn.proto
        while not self.draining:
            try:
                request = await self._read_head(conn)
            except BadRequest as exc:
                log.info("%s: bad request: %s", conn.peer, exc)
                data = proto.error_response(exc.status_hint, str(exc))
                if data:
                    await send_final(conn.stream, data)
                    conn.linger = True
                return
            if request is None:
                return
            try:
                keep = await self._answer(conn, request)
                # a body-less GET's end is waiting in h11: taken here, with no generator
                if keep and not proto.client_done and proto.next_event() is not END_OF_BODY:
                    async for _ in self._read_body(conn):
                        pass  # what a forward left unread
            except (ClientGone, BadRequest, trio.TooSlowError):
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not keep or not proto.reusable:
                return
            proto.start_next_cycle()

    async def _read_head(self, conn: Conn) -> Request | None:
        """The next request head; None when the client closed or idled out."""
        proto = conn.proto
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
                head_deadline = trio.current_time() + self.config.timeouts.request_head
            data: bytes | bytearray | None = None
            try:
                if conn.raw is not None:
                    data = receive_nowait(conn.raw, RECEIVE_SIZE)
            except trio.BrokenResourceError:
                return None
            if data is None:  # none waiting: wait, under the head or keep-alive timeout
                data = await self._wait_bytes(conn, head_deadline)
                if data is None:
                    return None
            else:  # bytes were waiting: no timeout to arm, and one schedule point
                await trio.lowlevel.cancel_shielded_checkpoint()
            proto.receive_data(data)
            if data and head_deadline == math.inf:
                head_deadline = trio.current_time() + self.config.timeouts.request_head

    async def _wait_bytes(self, conn: Conn, head_deadline: float) -> bytes | bytearray | None:
        """The client's next bytes (b"": it closed), waited for until ``head_deadline``,
        or for the keep-alive timeout while idle (``inf``); None when that passed, the
        node drains an idle connection, or the connection broke."""
        t = self.config.timeouts
        idle = head_deadline == math.inf
        deadline = trio.current_time() + t.keepalive if idle else head_deadline
        with trio.CancelScope(deadline=deadline) as scope:
            if idle:
                conn.idle_scope = scope
                if self.draining:
                    scope.cancel()
            try:
                if conn.raw is None:  # TLS: through trio's stream
                    return await conn.stream.receive_some(RECEIVE_SIZE)
                while True:
                    await trio.lowlevel.wait_readable(conn.sock)
                    data = receive_nowait(conn.raw, RECEIVE_SIZE)
                    if data is not None:
                        return data
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            finally:
                conn.idle_scope = None
        if not idle and not self.draining:
            log.info("%s: request head not complete in %.0fs: closing", conn.peer, t.request_head)
        return None

    async def _answer(self, conn: Conn, req: Request) -> bool:
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
            rec.cache = "aborted"  # whatever was planned, the response broke off
            raise ClientGone() from None
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
            self.metrics.record(rec.cache, rec.bytes, rec.duration, host_of(rec.url), rec.url)
        return keep

    async def _dispatch(self, conn: Conn, req: Request, rec: AccessRecord) -> bool:
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
        policy = self.cache.policy
        route = self.routes.route(
            req.target, req.header("host"), self.own, self.config.origin, policy.upstream_scheme
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

    def _names_no_origin(self, req: Request) -> bool:
        try:
            route_request(req.target, req.header("host"), self.own, None)
        except BadRequest:
            return True
        return False
