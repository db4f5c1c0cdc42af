"""Logging set-up and the access log: one line per response.

Access lines are ``key=value`` pairs (values with spaces quoted), written to the
``mcc.access`` logger, which goes to ``access_log`` (a file, ``-`` for standard
error, or empty for nowhere).
"""

from __future__ import annotations

import logging
import sys
import time

import attrs

from ..config import Config

__all__ = ["AccessRecord", "configure_logging", "write_access"]

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


def write_access(rec: AccessRecord) -> None:
    """Log one access line (cheap when the access log is off)."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(rec.line())


def configure_logging(config: Config) -> None:
    """Send mcc's logs to standard error at ``log_level`` and the access log where
    ``access_log`` says."""
    level = getattr(logging, config.log_level.upper())
    fmt = logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
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
