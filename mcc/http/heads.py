"""Response heads for hits, formatted from per-object templates.

Theory of operation: building a head through ``h11.Response`` validates and
normalises every field on every response, about a seventh of a small hit's time.
A stored object's fields (validators, type, the replayed header fields) only change
with a new version or a revalidation, so :class:`HeadTemplates` formats them once
per (object, version, fetch time) as canonical-case bytes, and each hit adds what
varies: status line, Date and Server (unless the stored fields replay the origin's),
Age, Cache-Status, Content-Range, Content-Length.
h11 is still told about the response (status and Content-Length, see
:meth:`~mcc.http.protocol.ServerProtocol.preformatted_head`), so it frames and
checks the body and keeps the connection's state as usual. Where h11 would change
the head (the client asked to close, or speaks HTTP/1.0), or a field cannot be
written as it is, the caller builds the head through h11 instead.

The templates are built by the same function that builds heads the slow way
(``object_headers``), so both ways send the same fields in the same order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus

from ..headers import canonical_name
from ..policy import age
from ..store.records import ObjectMeta
from .protocol import SERVER_NAME, ServerProtocol, http_date

__all__ = ["HeadTemplates"]

# Objects whose template is kept; past it the table starts again (a template is a
# few hundred bytes, and rebuilding one costs one slow head).
MAX_TEMPLATES = 4096
# What h11 accepts in a field value (RFC 9110 s5.5: visible characters, spaces and
# tabs inside, obs-text): anything else makes the slow path decide.
_FIELD_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]([\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?")
_NOT_TEMPLATABLE = b"\0"


def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")


_STATUS_LINES = {200: _status_line(200), 206: _status_line(206)}
_SERVER_LINE = f"Server: {SERVER_NAME}\r\n".encode("ascii")


def _field(name: str, value: str) -> bytes | None:
    """One ``Name: value`` line in canonical case; None when the value could not go
    out as it is (h11 would drop or refuse it)."""
    try:
        raw = value.encode("latin-1")
    except UnicodeError:
        return None
    if raw and not _FIELD_VALUE.fullmatch(raw):
        return None
    return canonical_name(name).encode("ascii") + b": " + raw + b"\r\n"


class HeadTemplates:
    """The per-object templates of one server (cleared on reload)."""

    def __init__(self) -> None:
        # (object key, version, fetch time) -> (fields, our Date?, our Server?)
        self._templates: dict[tuple[str, str, float], tuple[bytes, bool, bool]] = {}
        self._status_lines: dict[str, bytes] = {}  # Cache-Status value -> its line

    def clear(self) -> None:
        """Forget every template (a reload may change which fields are sent)."""
        self._templates.clear()
        self._status_lines.clear()

    def _template(
        self, meta: ObjectMeta, object_headers: Callable[[ObjectMeta], Sequence[tuple[str, str]]]
    ) -> tuple[bytes, bool, bool]:
        key = (meta.key, meta.version, meta.fetched_at)
        found = self._templates.get(key)
        if found is not None:
            return found
        fields = [(k, v) for k, v in object_headers(meta) if k != "age"]
        lines = [_field(k, v) for k, v in fields]
        names = {k for k, _ in fields}  # a replayed Date or Server replaces ours
        template = (
            _NOT_TEMPLATABLE if None in lines else b"".join(x for x in lines if x),
            "date" not in names,
            "server" not in names,
        )
        if len(self._templates) >= MAX_TEMPLATES:
            self._templates.clear()
        self._templates[key] = template
        return template

    def hit_head(
        self,
        proto: ServerProtocol,
        meta: ObjectMeta,
        status: int,
        *,
        cache_status: str | None,
        content_range: str | None,
        length: int,
        object_headers: Callable[[ObjectMeta], Sequence[tuple[str, str]]],
    ) -> bytes | None:
        """The head of a 200 or 206 hit, with h11 told of it; None when it must be
        built through h11 (see the module), nothing sent then.

        Args:
          proto: the connection's protocol state.
          meta: the object answered.
          status: 200 or 206.
          cache_status: the Cache-Status value (None: none sent).
          content_range: the Content-Range value of a 206.
          length: the body's length (Content-Length).
          object_headers: the stored object's fields, as the slow path sends them.
        """
        template, our_date, our_server = self._template(meta, object_headers)
        if template is _NOT_TEMPLATABLE or status not in _STATUS_LINES:
            return None
        status_line = b""
        if cache_status is not None:
            status_line = self._cache_status_line(cache_status)
            if status_line is _NOT_TEMPLATABLE:
                return None
        range_line = b""
        if content_range is not None:
            range_line = _field("content-range", content_range) or _NOT_TEMPLATABLE
            if range_line is _NOT_TEMPLATABLE:
                return None
        head = b"".join(
            (
                _STATUS_LINES[status],
                b"Date: %s\r\n" % http_date().encode("ascii") if our_date else b"",
                _SERVER_LINE if our_server else b"",
                template,
                b"Age: %d\r\n" % int(age(meta, time.time())),
                status_line,
                range_line,
                b"Content-Length: %d\r\n\r\n" % length,
            )
        )
        return proto.preformatted_head(status, length, head)

    def _cache_status_line(self, value: str) -> bytes:
        """The Cache-Status line for ``value`` (a handful of values per node: kept)."""
        line = self._status_lines.get(value)
        if line is None:
            line = _field("cache-status", value) or _NOT_TEMPLATABLE
            if len(self._status_lines) >= MAX_TEMPLATES:
                self._status_lines.clear()
            self._status_lines[value] = line
        return line
