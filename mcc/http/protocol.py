"""The server side of HTTP/1.x as a sans-I/O object: bytes in, events out; no trio here.

Wraps :class:`h11.Connection` and adds the checks a cache in front of everybody needs
(request smuggling shapes, head size) and the error mapping: every problem with what
the client sent becomes :class:`~mcc.errors.BadRequest` carrying the status to answer.

Events returned by :meth:`ServerProtocol.next_event`:

- :class:`Request`: a request head;
- ``bytes``: a piece of the request body;
- :data:`END_OF_BODY`: the request body is complete;
- :data:`NEED_DATA`: feed more bytes with :meth:`receive_data`;
- :data:`CLOSED`: the client closed cleanly between requests.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import attrs
import h11

from ..errors import BadRequest
from ..headers import canonical_name

__all__ = ["CLOSED", "END_OF_BODY", "NEED_DATA", "Request", "ServerProtocol"]

# RFC 9110 s5.4 lets a server refuse large heads with 431; 16 KiB fits every real
# client (apt and Delivery Optimization send well under 2 KiB) and bounds memory.
DEFAULT_MAX_HEAD = 16 * 1024

# RFC 9110 s4.1 recommends at least 8,000 octets; nginx answers 414 past 8 KiB too. A
# URL is a cache key, kept in memory and on disk: longer ones are refused, not stored.
MAX_TARGET = 8 * 1024

SERVER_NAME = "mcc"
_SERVER_BYTES = SERVER_NAME.encode("ascii")


_date_cache: tuple[int, str] = (0, "")
# The h11 events preformatted heads tell h11 of, by (status, Content-Length): events
# are immutable, and a hit path repeats a few (the table starts again when full).
_FRAMING_EVENTS: dict[tuple[int, int], h11.Response] = {}
_MAX_FRAMING_EVENTS = 1024


def http_date() -> str:
    """The Date header value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
END_OF_BODY = _Sentinel("END_OF_BODY")
CLOSED = _Sentinel("CLOSED")


@attrs.frozen
class Request:
    """A request head.

    Attributes:
      method: upper-case method.
      target: the request-target, decoded as latin-1.
      headers: (lower-case name, value) pairs in order.
      http_version: ``"1.1"`` or ``"1.0"``.
      has_body: True when a body follows (Content-Length > 0 or chunked).
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    http_version: str
    has_body: bool

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_list(self, name: str) -> list[str]:
        """Every value of ``name``, comma lists split."""
        out: list[str] = []
        for k, v in self.headers:
            if k == name:
                out += [p.strip() for p in v.split(",") if p.strip()]
        return out


class ServerProtocol:
    """One client connection's HTTP state.

    Args:
      max_head: the largest request head accepted (larger gets 431).
    """

    def __init__(self, max_head: int = DEFAULT_MAX_HEAD) -> None:
        self._max_head = max_head
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)

    # -- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the client (``b""`` means it closed its side)."""
        self._conn.receive_data(bytes(data))  # no copy when already bytes

    @property
    def has_partial_request(self) -> bool:
        """True when some bytes of a not yet complete request head are buffered."""
        return bool(self._conn.trailing_data[0]) and self._conn.their_state is h11.IDLE

    def next_event(self) -> Request | bytes | _Sentinel:
        """The next thing the client sent.

        Raises:
          BadRequest: the bytes are not acceptable HTTP (status_hint says which 4xx).
        """
        if self._conn.their_state is h11.IDLE:
            self._check_raw_head()
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc), status_hint=exc.error_status_hint) from None
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return NEED_DATA
        if isinstance(event, h11.Request):
            return self._request(event)
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return END_OF_BODY
        if isinstance(event, h11.ConnectionClosed):
            return CLOSED
        raise BadRequest(f"unexpected {type(event).__name__}")

    def _check_raw_head(self) -> None:
        """Refuse head shapes h11 tolerates but proxies must not (RFC 9112 s2.2, s5.2):
        a bare LF line ending and obs-fold continuation lines. Either lets two parsers
        in a chain disagree on where headers end (request smuggling)."""
        buf, _ = self._conn.trailing_data
        if not buf:
            return
        end = buf.find(b"\r\n\r\n")
        head = bytes(buf[: end + 4] if end >= 0 else buf).lstrip(b"\r\n")
        if head.count(b"\n") != head.count(b"\r\n"):
            raise BadRequest("bare LF line ending in the request head")
        if b"\r\n " in head or b"\r\n\t" in head:
            raise BadRequest("obs-fold (folded header line) in the request head")
        if end >= 0 and head.lower().count(b"\r\ncontent-length:") > 1:
            # h11 merges identical repeats; a proxy must not (RFC 9112 s6.3)
            raise BadRequest("repeated Content-Length: refused (smuggling)")

    def _request(self, event: h11.Request) -> Request:
        if len(event.target) > MAX_TARGET:
            raise BadRequest(
                f"request target of {len(event.target)} bytes exceeds {MAX_TARGET}",
                status_hint=414,
            )
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
        # h11 enforces the limit only on heads that arrive in pieces; a head that came
        # in one read is measured here (request line + "name: value\r\n" per header)
        size = len(event.target) + 14 + sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self._max_head:
            raise BadRequest(
                f"request head of {size} bytes exceeds {self._max_head}", status_hint=431
            )
        names = [k for k, _ in headers]
        if "transfer-encoding" in names and "content-length" in names:
            raise BadRequest("both Transfer-Encoding and Content-Length: refused (smuggling)")
        if names.count("content-length") > 1 or names.count("transfer-encoding") > 1:
            raise BadRequest("repeated Content-Length or Transfer-Encoding: refused (smuggling)")
        for k, v in headers:
            if "\r" in v or "\n" in v:
                raise BadRequest(f"header {k} carries a line break")
        length = next((v for k, v in headers if k == "content-length"), "0")
        has_body = "transfer-encoding" in names or length.strip() not in ("", "0")
        return Request(
            method=event.method.decode("ascii").upper(),
            target=event.target.decode("latin-1"),
            headers=headers,
            http_version=event.http_version.decode("ascii"),
            has_body=has_body,
        )

    # -- output --------------------------------------------------------------------

    def response_head(self, status: int, headers: Sequence[tuple[str, str]]) -> bytes:
        """The bytes of a response head (Date and Server added unless given: an
        origin's are passed on).

        Every header name goes out in its canonical case (``Content-Length``, ``ETag``):
        h11 writes names as handed to it, and some clients match them case-sensitively.
        Values travel as the latin-1 bytes they came as (an origin's UTF-8
        Content-Disposition, obs-text); one that cannot is dropped, not fatal.
        """
        given = {name for name, _ in headers}
        full = [] if "date" in given else [(b"Date", http_date().encode("ascii"))]
        if "server" not in given:
            full.append((b"Server", _SERVER_BYTES))
        for name, value in headers:
            try:
                full.append((canonical_name(name).encode("ascii"), value.encode("latin-1")))
            except UnicodeError:
                continue
        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        return self._conn.send(h11.Response(status_code=status, headers=full, reason=reason)) or b""

    def preformatted_head(self, status: int, content_length: int, head: bytes) -> bytes | None:
        """Take ``head``, formatted elsewhere (a hit's template, :mod:`mcc.http.heads`),
        as this response's head: h11 is told of a response with ``status`` and
        ``content_length``, so it frames and checks the body and keeps the
        connection's state as if it had written the head itself.

        Returns:
          ``head``, to be sent; None when h11 would have changed the head (the
          client asked to close, or speaks HTTP/1.0): build it with
          :meth:`response_head` then. Nothing is sent in that case.
        """
        conn = self._conn
        if conn.their_http_version != b"1.1" or not conn._cstate.keep_alive:
            return None
        event = _FRAMING_EVENTS.get((status, content_length))
        if event is None:
            framing = [(b"content-length", b"%d" % content_length)]
            # _parsed: the one field is ours and valid; h11's own rendering is dropped
            event = h11.Response(status_code=status, headers=framing, reason=b"", _parsed=True)
            if len(_FRAMING_EVENTS) >= _MAX_FRAMING_EVENTS:
                _FRAMING_EVENTS.clear()
            _FRAMING_EVENTS[(status, content_length)] = event
        conn.send(event)
        return head

    def body(self, data: Any) -> list[Any]:
        """Frame a body piece; ``data`` may be any object with ``__len__`` (for sendfile).

        Returns:
          The pieces to write, in order: ``bytes`` framing and ``data`` itself.
        """
        return self._conn.send_with_data_passthrough(h11.Data(data=data)) or []

    def end(self) -> bytes:
        """The bytes that end the response body."""
        return self._conn.send(h11.EndOfMessage()) or b""

    def error_response(self, status: int, message: str) -> bytes | None:
        """A whole plain-text error response with ``Connection: close``, when one may
        still be sent (no response started); else None. The connection must be closed
        after it: it is written by hand, since h11 may be in its ERROR state."""
        if self.response_started:
            return None
        body = (message.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8", "replace")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            f"Date: {http_date()}\r\n"
            f"Server: {SERVER_NAME}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body

    @property
    def reusable(self) -> bool:
        """True when both sides finished this exchange and keep-alive holds."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    @property
    def response_started(self) -> bool:
        """True once a response head was produced for the current request."""
        return self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def client_done(self) -> bool:
        """True when the current request, body included, was read completely."""
        return self._conn.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """Reset for the next request on a kept-alive connection."""
        self._conn.start_next_cycle()
