"""Logging set-up and the access log: one line per response.

Access lines are ``key=value`` pairs (values with spaces quoted), written to the
``mcc.access`` logger, which goes to ``access_log`` (a file, ``-`` for standard
error, or empty for nowhere).
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
    cache: str = ""
    duration: float = 0.0

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


def _q(value: str) -> str:
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{value}"' if (not value or any(c in value for c in ' "=')) else value


_json_access = False


def write_access(rec: AccessRecord) -> None:
    """Log one access line (cheap when the access log is off)."""
    if not access_log.disabled and access_log.isEnabledFor(logging.INFO):
        access_log.info(json.dumps(rec.as_dict()) if _json_access else rec.line())


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
    ``access_log`` says."""
    global _json_access
    level = getattr(logging, config.log_level.upper())
    fmt: logging.Formatter = (
        JsonFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    _json_access = config.log_format == "json"
    root = logging.getLogger("mcc")
    root.setLevel(level)
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    access_log.propagate = False
    access_log.handlers.clear()
    access_log.setLevel(logging.INFO)
    target = config.access_log
    if target == "":
        access_log.disabled = True
        return
    access_log.disabled = False
    out: logging.Handler = (
        logging.StreamHandler(sys.stderr) if target == "-" else logging.FileHandler(target)
    )
    out.setFormatter(logging.Formatter("%(message)s"))
    access_log.addHandler(out)
