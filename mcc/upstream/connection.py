"""One upstream HTTP/1.1 connection on h11, and the response read from it.

Theory of operation: a :class:`Connection` carries one request at a time (mcc never
pipelines upstream). Its :class:`UpstreamResponse` reads the body through h11, or,
for a body framed by Content-Length, straight from the socket into the caller's
buffer (no copy through h11); either way the framing is h11's or checked here, and
what the connection may be used for next is decided by the pool
(:mod:`mcc.upstream.client`): reused only after a complete keep-alive response with
nothing unread behind it (:func:`quiet`).

Header values travel as the latin-1 bytes they arrived as; a field that cannot be
sent is dropped (:func:`wire_headers`).
"""

from __future__ import annotations

import re
import select
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import attrs
import h11
import trio

from ..errors import Refused, UpstreamError
from ..headers import HOP_BY_HOP, is_digits
from .splice import Splicer
from .tls import describe_tls_error, is_verify_error

__all__ = [
    "HOP_BY_HOP",
    "MAX_RESPONSE_HEAD",
    "RECEIVE_SIZE",
    "Connection",
    "Route",
    "UpstreamResponse",
    "body_length",
    "map_errors",
    "quiet",
    "wire_headers",
]

# Bytes asked of the socket per receive: large enough that a 1 MiB block takes
# a few dozen calls, small enough to bound the memory one connection holds.
RECEIVE_SIZE = 256 * 1024
# RFC 9110 s5.4 leaves the limit to us; h11's default (16 KiB) refuses larger heads.
MAX_RESPONSE_HEAD = 64 * 1024

# RFC 9110 s5.1 (field-name is a token) and s5.5 (no control character but HTAB in a value).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def body_length(response: UpstreamResponse) -> int:
    length = response.header("content-length")
    return int(length) if length is not None and is_digits(length) else 0


class ByteCounter(Protocol):
    """Whatever counts the bytes received upstream (the node's :class:`Upstream`)."""

    bytes_received: int


@attrs.frozen
class Route:
    """One way upstream: where to connect and whether to use proxy (absolute) form.

    ``tls_name`` is the name TLS verifies (and sends as SNI), None for plain TCP;
    ``tunnel`` is the ``host:port`` to CONNECT to through the proxy at host:port first.
    """

    name: str
    host: str
    port: int
    proxy_form: bool
    is_parent: bool = False
    tls_name: str | None = None
    tunnel: str | None = None
    is_peer: bool = False

    @property
    def pool_key(self) -> tuple[str, int, str | None, str | None]:
        return (self.host, self.port, self.tls_name, self.tunnel)


class Connection:
    def __init__(
        self,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        key: tuple[str, int, str | None, str | None],
    ) -> None:
        self.stream = stream
        self.key = key
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.reused = False
        self.reusable_fresh = False  # a body read past h11 ended cleanly
        self.keep_alive = True  # the last response allows another request
        self.idle_since = 0.0  # when it went into the pool (time.monotonic)
        self._head = b""  # the start of a response head not yet complete (line ends checked)

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self, read_timeout: float) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(read_timeout):
                    data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
                if self.h11.their_state is h11.SEND_RESPONSE:
                    self._head = _head_so_far(self._head + data if self._head else data)
                self.h11.receive_data(data)  # bytes(): no copy for a plain socket's bytes
                continue
            assert not isinstance(event, type)  # PAUSED cannot happen: one request per cycle
            return event


# The end of a response head as h11 finds it (a blank line, CR optional), and a line
# feed with no CR before it.
_HEAD_END = re.compile(rb"\n\r?\n")
_BARE_LF = re.compile(rb"(?<!\r)\n")


def _head_so_far(data: bytes) -> bytes:
    """Refuse a response head with a bare LF (RFC 9112 s2.2 lets a recipient accept
    one; mcc does not). Where intermediaries disagree on line ends, one reads a
    field's value as the end of the head and the rest as the body: a response that
    means two things is not cached or passed on.

    ``data`` is what arrived since the head began; returns what to keep for the next
    check: nothing once the head is complete (body bytes behind it are not copied
    again), else all of it."""
    end = _HEAD_END.search(data)
    if _BARE_LF.search(data, 0, end.end() if end else len(data)):
        raise h11.RemoteProtocolError("a bare LF in the response head")
    return b"" if end else data


class UpstreamResponse:
    """A response head from upstream plus its body, read with :meth:`receive`.

    Attributes:
      status: the status code.
      headers: (lower-case name, value) pairs, hop-by-hop headers removed.
      route: the route that answered.
    """

    def __init__(
        self,
        conn: Connection,
        response: h11.Response,
        route: Route,
        timeout: float,
        counters: ByteCounter | None = None,
        method: str = "GET",
    ) -> None:
        self._conn = conn
        self._counters = counters
        self.route = route
        self.status = response.status_code
        self.reason = response.reason.decode("latin-1")
        # RFC 9110 s7.6.1: hop-by-hop fields go, and so does every field Connection names
        named = {
            n.strip().lower()
            for k, v in response.headers
            if k == b"connection"
            for n in v.decode("latin-1").split(",")
        }
        self.headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.headers
            if k.decode("latin-1") not in HOP_BY_HOP and k.decode("latin-1") not in named
        ]
        self._timeout = timeout
        self.complete = False
        # RFC 9112 s9.3: HTTP/1.0 closes unless asked otherwise (h11 never keeps a 1.0
        # connection), and "Connection: close" closes; h11 knows this for the bodies it
        # frames, a body read past h11 (below) must remember it here
        tokens = {
            t.strip().lower()
            for k, v in response.headers
            if k.lower() == b"connection"
            for t in v.split(b",")
        }
        conn.keep_alive = response.http_version == b"1.1" and b"close" not in tokens
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
        with map_errors(self.route, "reading the body"):
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
        remaining = self._direct_left()
        if not remaining:
            return 0
        want = min(len(buf), remaining)
        if self._pending:
            n = min(want, len(self._pending))
            buf[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        else:
            stream = self._conn.stream
            with map_errors(self.route, "reading the body"), trio.fail_after(self._timeout):
                if isinstance(stream, trio.SocketStream):
                    n = await stream.socket.recv_into(buf[:want])
                else:  # TLS: the socket holds ciphertext; read through the SSL stream
                    data = await stream.receive_some(want)
                    n = len(data)
                    buf[:n] = data
            self._check_more(n, remaining)
        self._took_direct(n, remaining, self._pending)
        return n

    @property
    def can_splice(self) -> bool:
        """True when :meth:`splice_into` may be used now: a Content-Length body on a
        plain TCP socket, with no body bytes already read past the head."""
        return (
            self._direct_remaining is not None
            and not self._pending
            and isinstance(self._conn.stream, trio.SocketStream)
        )

    async def splice_into(self, splicer: Splicer, fd: int, offset: int, count: int) -> int:
        """Move up to ``count`` body bytes into file ``fd`` at ``offset`` (see
        :mod:`mcc.upstream.splice`); returns how many (0 at the end).

        Raises:
          UpstreamError: as :meth:`receive`.
          FileWriteError: the file could not be written (this call's bytes are lost).
        """
        remaining = self._direct_left()
        if not remaining:
            return 0
        stream = self._conn.stream
        assert isinstance(stream, trio.SocketStream) and not self._pending
        with map_errors(self.route, "reading the body"), trio.fail_after(self._timeout):
            n = await splicer.move(stream.socket, fd, offset, min(count, remaining))
        self._check_more(n, remaining)
        self._took_direct(n, remaining, b"")
        return n

    def _direct_left(self) -> int:
        """Body bytes still to come for :meth:`receive_into` / :meth:`splice_into`
        (0: none, the body finished now or before)."""
        remaining = self._direct_remaining
        if self.complete or remaining is None:
            return 0
        if remaining == 0:
            self._finish_direct(b"")
        return remaining

    def _check_more(self, n: int, remaining: int) -> None:
        if not n:
            raise UpstreamError(
                f"{self.route.name}: connection closed {remaining} bytes before the end of the body"
            )

    def _took_direct(self, n: int, remaining: int, rest: bytes) -> None:
        remaining -= n
        self._direct_remaining = remaining
        if self._counters is not None:
            self._counters.bytes_received += n
        if remaining == 0:
            self._finish_direct(rest)

    async def _receive_direct(self) -> bytes:
        remaining = self._direct_remaining
        assert remaining is not None
        if remaining == 0:
            self._finish_direct(b"")
            return b""
        if self._pending:
            data, self._pending = self._pending[:remaining], self._pending[remaining:]
        else:
            with map_errors(self.route, "reading the body"), trio.fail_after(self._timeout):
                data = bytes(await self._conn.stream.receive_some(min(remaining, RECEIVE_SIZE)))
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
        self._conn.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self._conn.reusable_fresh = not leftover and self._conn.keep_alive

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Every remaining piece of the body."""
        while chunk := await self.receive():
            yield chunk


def quiet(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> bool:
    """True when nothing is waiting to be read on an idle upstream connection: no
    bytes (which would be read as the answer to the next request: a response
    desync) and no end of stream (the peer closed it while it sat in the pool).

    Over TLS, readable bytes may be the server's session tickets, which are no
    desync: there only a close (or an error) counts, and bytes after a response
    body are caught by the framing (h11's trailing data) instead."""
    events = select.POLLRDHUP | select.POLLERR | select.POLLHUP
    if isinstance(stream, trio.SocketStream):
        sock = stream.socket
        events |= select.POLLIN
    else:
        sock = stream.transport_stream.socket
    try:
        poller = select.poll()
        poller.register(sock.fileno(), events)
        return not poller.poll(0)
    except (OSError, ValueError):  # closed meanwhile
        return False


def wire_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header fields as the bytes to send: values travel as the latin-1 bytes they
    arrived as (RFC 9110 s5.5 obs-text); a field that cannot be sent (a name that is
    not a token, a control character in the value, a character past U+00FF) is dropped
    rather than allowed to fail the request."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        try:
            k, v = name.encode("ascii"), value.encode("latin-1")
        except UnicodeError:
            continue
        if not _TOKEN.fullmatch(k) or _BAD_VALUE.search(v):
            continue
        out.append((k, v.strip(b" \t")))
    return out


@contextmanager
def map_errors(route: Route, doing: str) -> Iterator[None]:
    try:
        yield
    except trio.TooSlowError:
        raise UpstreamError(f"{route.name}: timed out {doing}", status_hint=504) from None
    except h11.ProtocolError as exc:
        raise UpstreamError(f"{route.name}: broken HTTP while {doing}: {exc}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        tls = describe_tls_error(exc)
        if tls is not None:
            # an untrusted certificate will be presented again: Refused is not retried
            kind = Refused if is_verify_error(exc) else UpstreamError
            raise kind(f"{route.name}: {tls} while {doing}; not fetched", status_hint=502) from None
        raise UpstreamError(f"{route.name}: connection failed while {doing}: {exc}") from None
