"""Logging set-up and the access log: one line per response.

Access lines are written to the ``mcc.access`` logger, which goes to ``access_log``
(a file, ``-`` for standard error, or empty for nowhere), in ``access_log_format``:

- ``kv``: ``key=value`` pairs (values with spaces quoted), mcc's own fields;
- ``combined``: the Apache/nginx combined format, for log tools that expect it
  (``%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"``);
- ``json``: one object per line with the ``kv`` fields.

:func:`configure_logging` may run again (on SIGHUP): it closes the old handlers, so
a log file renamed by logrotate is let go and the configured path opened anew.

Access lines do not go through a ``logging`` call each (that cost about a tenth of
a small hit's time): :func:`write_access` formats the line and appends it to a
buffer, written to the access log's stream in one piece when it holds
:data:`FLUSH_BYTES`, or when a line finds the oldest waiting one older than
:data:`FLUSH_SECONDS`, and by :func:`flush_access` (the server calls it every
:data:`FLUSH_SECONDS`, when it stops, and :func:`configure_logging` before it lets
the old file go). As nginx's ``access_log ... buffer= flush=``: a crash loses at
most the last fraction of a second of lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any

import attrs
import trio

from ..config import Config

__all__ = [
    "FLUSH_SECONDS",
    "AccessRecord",
    "JsonFormatter",
    "configure_logging",
    "flush_access",
    "run_access_flusher",
    "write_access",
]

access_log = logging.getLogger("mcc.access")

# Longest a written access line waits in memory before it reaches the log (nginx's
# access_log flush= is often set to 1 s; tail -f users want less).
FLUSH_SECONDS = 0.25
# Buffered bytes that are written at once whatever their age (nginx's buffer= default
# is 64 KiB); about 300 lines of a typical kv line.
FLUSH_BYTES = 64 * 1024


@attrs.define
class AccessRecord:
    """What one response did; filled in as the request is answered."""

    client: str
    method: str
    url: str
    range: str = "-"
    status: int = 0
    bytes: int = 0
    cache: str = ""  # the outcome (mcc.ops.outcome): Cache-Status and counters derive from it
    duration: float = 0.0
    fwd_status: int = 0  # the status upstream answered, when asked (Cache-Status fwd-status)
    target: str = ""  # the request-target as sent (the combined format's request line)
    http_version: str = "1.1"
    referer: str = "-"
    user_agent: str = "-"

    def as_dict(self) -> dict[str, object]:
        """The record as a JSON-ready mapping."""
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "client": self.client,
            "method": self.method,
            "url": self.url,
            "range": self.range,
            "status": self.status,
            "bytes": self.bytes,
            "cache": self.cache or "-",
            "duration_ms": round(self.duration * 1000, 1),
        }

    def line(self) -> str:
        """The record as one ``key=value`` line."""
        stamp = _stamp()
        return (
            f"time={stamp}Z client={self.client} method={self.method} url={_q(self.url)} "
            f"range={_q(self.range)} status={self.status} bytes={self.bytes} "
            f"cache={self.cache or '-'} duration_ms={self.duration * 1000:.1f}"
        )

    def combined(self) -> str:
        """The record in the Apache/nginx combined log format."""
        host = self.client.rsplit(":", 1)[0] if ":" in self.client else self.client
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime())
        request = f"{self.method} {self.target or self.url} HTTP/{self.http_version}"
        size = str(self.bytes) if self.bytes else "-"
        return (
            f'{host} - - [{stamp}] "{_esc(request)}" {self.status} {size} '
            f'"{_esc(self.referer)}" "{_esc(self.user_agent)}"'
        )


def _esc(value: str) -> str:
    """Escape as Apache does in quoted log fields: backslash, quote, control bytes."""
    out = []
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) >= 0x7F:
            raw = c.encode("latin-1") if ord(c) < 256 else c.encode("utf-8", "replace")
            out.append("".join(f"\\x{b:02x}" for b in raw))
        else:
            out.append(c)
    return "".join(out)


def _q(value: str) -> str:
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{value}"' if (not value or any(c in value for c in ' "=')) else value


_stamp_cache: tuple[int, str] = (0, "")


def _stamp() -> str:
    """The kv lines' UTC time stamp, formatted once per second."""
    global _stamp_cache
    now = int(time.time())
    if _stamp_cache[0] != now:
        _stamp_cache = (now, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)))
    return _stamp_cache[1]


_access_format = "kv"
# The stream access lines go to (None: the access log is off), the lines waiting for
# it, their size and when the oldest was written (time.monotonic()).
_out: logging.StreamHandler[Any] | None = None
_pending: list[str] = []
_pending_bytes = 0
_oldest = 0.0
_flushers: set[trio.Event] = set()  # each flusher's wake-up: a line in an empty buffer


def write_access(rec: AccessRecord) -> None:
    """Buffer one access line (nothing when the access log is off); written out by
    size or age (see the module). Without an ``access_log`` of its own, a handler put
    on the ``mcc.access`` logger (an embedder's, a test's) gets one record per line."""
    global _pending_bytes, _oldest
    if _out is None and (access_log.disabled or not access_log.handlers):
        return
    if _access_format == "combined":
        line = rec.combined()
    elif _access_format == "json":
        line = json.dumps(rec.as_dict())
    else:
        line = rec.line()
    if _out is None:  # no log of ours, but a handler an embedder put on mcc.access
        access_log.info(line)
        return
    now = time.monotonic()
    if not _pending:
        _oldest = now
        for flusher in _flushers:
            flusher.set()
    _pending.append(line)
    _pending_bytes += len(line) + 1
    if _pending_bytes >= FLUSH_BYTES or now - _oldest >= FLUSH_SECONDS:
        flush_access()


async def run_access_flusher() -> None:
    """Write buffered lines at most :data:`FLUSH_SECONDS` after they came, until
    cancelled, and the rest then. Sleeps while nothing waits (no idle ticking)."""
    try:
        while True:
            wake = trio.Event()
            _flushers.add(wake)
            try:
                if not _pending:
                    await wake.wait()
            finally:
                _flushers.discard(wake)
            await trio.sleep(FLUSH_SECONDS)
            flush_access()
    finally:
        flush_access()


def flush_access() -> None:
    """Write the buffered access lines to the access log now (in one write)."""
    global _pending_bytes
    if not _pending:
        return
    text = "\n".join(_pending) + "\n"
    _pending.clear()
    _pending_bytes = 0
    out = _out
    if out is None:
        return
    try:
        with out.lock or contextlib.nullcontext():
            out.stream.write(text)
            out.stream.flush()
    except (OSError, ValueError) as exc:  # disk full, a closed stream: lines are lost
        logging.getLogger("mcc").warning("access log write failed: %s", exc)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(config: Config) -> None:
    """Send mcc's logs to standard error at ``log_level`` and the access log where
    ``access_log`` says, in ``access_log_format``. Safe to call again: the handlers
    it set up before are closed (log files are reopened by path).

    Raises:
      OSError: the access log file cannot be opened.
    """
    global _access_format, _out
    level = getattr(logging, config.log_level.upper())
    fmt: logging.Formatter = (
        JsonFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    # open the new access log first: when it fails, the old set-up stays whole
    target = config.access_log
    out: logging.StreamHandler[Any] | None = None
    if target == "-":
        out = logging.StreamHandler(sys.stderr)
    elif target:
        out = logging.FileHandler(target)
    flush_access()  # lines so far go to the file they were written for
    _access_format = config.access_log_format
    root = logging.getLogger("mcc")
    root.setLevel(level)
    _close_handlers(root)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    access_log.propagate = False
    _close_handlers(access_log)
    access_log.setLevel(logging.INFO)
    if out is None:
        access_log.disabled = True
        _out = None
        return
    access_log.disabled = False
    out.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(out)  # closed with the others on the next reconfiguration
    _out = out


def _close_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if not (isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr):
            handler.close()
