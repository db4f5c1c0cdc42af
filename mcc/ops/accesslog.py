"""Logging set-up and the access log: one line per response.

Access lines are written to the ``mcc.access`` logger, which goes to ``access_log``
(a file, ``-`` for standard error, or empty for nowhere), in ``access_log_format``:

- ``kv``: ``key=value`` pairs (values with spaces quoted), mcc's own fields;
- ``combined``: the Apache/nginx combined format, for log tools that expect it
  (``%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"``);
- ``json``: one object per line with the ``kv`` fields.

:func:`configure_logging` may run again (on SIGHUP): it closes the old handlers, so
a log file renamed by logrotate is let go and the configured path opened anew.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import attrs

from ..config import Config

__all__ = ["AccessRecord", "JsonFormatter", "configure_logging", "write_access"]

access_log = logging.getLogger("mcc.access")


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
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
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


_access_format = "kv"


def write_access(rec: AccessRecord) -> None:
    """Log one access line (cheap when the access log is off)."""
    if not access_log.disabled and access_log.isEnabledFor(logging.INFO):
        if _access_format == "combined":
            access_log.info(rec.combined())
        elif _access_format == "json":
            access_log.info(json.dumps(rec.as_dict()))
        else:
            access_log.info(rec.line())


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
    global _access_format
    level = getattr(logging, config.log_level.upper())
    fmt: logging.Formatter = (
        JsonFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    # open the new access log first: when it fails, the old set-up stays whole
    target = config.access_log
    out: logging.Handler | None = None
    if target == "-":
        out = logging.StreamHandler(sys.stderr)
    elif target:
        out = logging.FileHandler(target)
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
        return
    access_log.disabled = False
    out.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(out)


def _close_handlers(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if not (isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr):
            handler.close()
