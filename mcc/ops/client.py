"""A small client of a running node's admin API, for ``mcc stats|warm|purge``.

Synchronous (urllib): these commands do one thing and exit. Every failure becomes
:class:`AdminError` with one line for the user.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ..config import Config
from ..errors import McError

__all__ = ["ADMIN_HEADER", "AdminClient", "AdminError"]

# Seconds to wait for the admin API before saying the node is not there.
_TIMEOUT = 10.0
# The custom header the admin API requires on writes when no admin_token is set (with
# Content-Type: application/json). A browser cannot add it to a cross-site request
# without a CORS preflight, which the admin API never grants.
ADMIN_HEADER = "X-MCC-Admin"


class AdminError(McError):
    """The admin API could not be reached, or refused the request."""


class AdminClient:
    """Talks to the admin API named by ``config.admin_listen`` with its token.

    Every request carries the :data:`ADMIN_HEADER` header, and bodies are sent as
    ``application/json``, so writes pass the admin API's guard when no token is set.
    The Host header is the address connected to, which the admin API accepts.
    """

    def __init__(self, config: Config) -> None:
        addr = config.admin_listen
        host = "127.0.0.1" if addr.host in ("0.0.0.0", "") else addr.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        self.base = f"http://{host}:{addr.port}"
        self.token = config.admin_token

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = _TIMEOUT,
    ) -> Any:
        """One request; returns the decoded JSON answer.

        Raises:
          AdminError: one line saying what went wrong.
        """
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header(ADMIN_HEADER, "1")
        if data is not None:
            req.add_header("content-type", "application/json")
        if self.token:
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise AdminError(
                    f"the admin API at {self.base} refused the token (set --admin-token)"
                ) from None
            detail = exc.read().decode("utf-8", "replace").strip()
            try:
                detail = json.loads(detail).get("error", detail)
            except (ValueError, AttributeError):
                pass
            if exc.code == 503 and path == "/health":
                return json.loads(detail) if detail.startswith("{") else {"ready": False}
            raise AdminError(f"{method} {path} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"no mcc node answers at {self.base} ({reason}); is it running?"
            ) from None
