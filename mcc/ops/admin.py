"""The admin listener: metrics, summary, health, warm, purge and a status page.

Endpoints:

- ``GET /metrics``: Prometheus text exposition (see :mod:`mcc.ops.collector`).
- ``GET /summary``: JSON in the spirit of Connected Cache's summary report;
  ``?cluster=1`` adds up every peer's summary too (see :mod:`mcc.ops.cluster`).
- ``GET /health``: readiness JSON; 503 when a drive is not writable or the index fails.
- ``POST /warm`` ``{"urls": [...]}``: pre-seed in the background; ``GET /warm/<id>``
  shows its progress in objects and bytes (rate, time left; see :mod:`mcc.ops.warm`).
- ``POST /purge`` ``{"url": ...}``, ``{"prefix": "http://..."}`` or
  ``{"pattern": "host, host:port or *.suffix"}``.
- ``POST /verify``: check every blob of the running cache; ``{"repair": true}``
  quarantines corrupt blobs at once (no longer served, refetched).
- ``GET /``: an HTML status page that refreshes itself.

Who may ask, and what a request may carry, is :mod:`mcc.ops.guards` (Host check
against DNS rebinding, write guard, token, bounded bodies and URLs). Any unexpected
exception becomes a 500 with one logged traceback and a count in
``mcc_internal_errors_total{where="admin"}``; the listener and the node go on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from ..config import Config
from ..engine.engine import Cache
from ..errors import BadRequest
from ..http.protocol import Request, ServerProtocol
from . import actions, reports
from .cluster import cluster_summary
from .collector import CONTENT_TYPE, node_registry, render
from .guards import (
    SAFE_METHODS,
    check_request,
    check_url,
    listener_names,
    local_names,
    parse_json,
    read_request,
)
from .metrics import Metrics
from .sockets import open_tcp_listeners
from .warm import MAX_WARM_URLS, WarmJob, WarmJobs

__all__ = ["AdminServer"]

log = logging.getLogger("mcc.admin")

_JSON = "application/json"


class AdminServer:
    """Serves the admin API.

    Args:
      cache: the engine.
      metrics: the HTTP server's response counters.
      open_connections: a function returning the number of client connections.
    """

    def __init__(self, cache: Cache, metrics: Metrics, open_connections: Callable[[], int]) -> None:
        self.cache = cache
        self.metrics = metrics
        self._open_connections = open_connections
        # this node's collector in a registry of its own (not prometheus_client's global)
        self.registry = node_registry(cache, metrics, open_connections)
        self.warm_jobs = WarmJobs(cache, self._warm_internal_error)
        self._nursery: trio.Nursery | None = None
        self.port = 0
        self._names = listener_names(self.config)

    @property
    def config(self) -> Config:
        """The config in force (the engine's: a reload on SIGHUP replaces it)."""
        return self.cache.config

    @property
    def jobs(self) -> dict[str, WarmJob]:
        """The warm jobs remembered, by id."""
        return self.warm_jobs.jobs

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``admin_listen`` until cancelled; started() gets the bound port.

        Raises:
          OSError: the address cannot be bound (message names it).
        """
        addr = self.config.admin_listen
        try:
            listeners = await open_tcp_listeners(addr.port, host=addr.host)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr} (admin): {exc.strerror}") from None
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        proto = ServerProtocol()
        names = self._names | local_names(stream)
        try:
            while True:
                with trio.move_on_after(self.config.timeouts.keepalive) as idle:
                    req, body = await read_request(proto, stream)
                if idle.cancelled_caught or req is None:
                    return
                status, ctype, payload = await self._answer(req, body, names)
                headers = [("content-type", ctype), ("content-length", str(len(payload)))]
                if status == 401:
                    headers.append(("www-authenticate", 'Bearer realm="mcc"'))
                data = proto.response_head(status, headers)
                if req.method != "HEAD":
                    data += b"".join(proto.body(payload))
                data += proto.end()
                await stream.send_all(data)
                if not proto.reusable:
                    return
                proto.start_next_cycle()
        except BadRequest as exc:
            refusal = proto.error_response(exc.status_hint, str(exc))
            if refusal:
                with trio.move_on_after(5):
                    await stream.send_all(refusal)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except Exception:
            # a bug outside the handlers (reading or sending): this connection ends,
            # the admin listener and the node go on
            self._internal_error("admin connection")
        finally:
            await stream.aclose()

    async def _answer(
        self, req: Request, body: bytes, names: frozenset[str]
    ) -> tuple[int, str, bytes]:
        """Route one request; every failure becomes a status, none escapes."""
        try:
            return await self._route(req, body, names)
        except BadRequest as exc:
            return exc.status_hint, _JSON, _json_error(str(exc))
        except Exception:
            self._internal_error(f"admin {req.method} {req.target[:200]!r}")
            return 500, _JSON, _json_error("internal error (logged on the node)")

    def _internal_error(self, what: str) -> None:
        """Count and log the exception being handled (call inside ``except``)."""
        self.metrics.internal_errors.admin += 1
        log.error("%s failed with an internal error", what, exc_info=True)

    def _warm_internal_error(self, what: str) -> None:
        """As :meth:`_internal_error`, for a warm job."""
        self.metrics.internal_errors.warm += 1
        log.error("%s failed with an internal error", what, exc_info=True)

    async def _route(
        self, req: Request, body: bytes, names: frozenset[str]
    ) -> tuple[int, str, bytes]:
        path = urlsplit(req.target).path
        check_request(req, path, names, port=self.port, config=self.config)
        if req.method not in ("GET", "HEAD", "POST"):
            raise BadRequest(f"{req.method} is not supported here", status_hint=405)
        if req.method in SAFE_METHODS:
            return await self._read(req, path)
        doc = parse_json(body)
        if path == "/warm":
            return 202, _JSON, _json(self._start_warm_request(doc).as_json())
        if path == "/purge":
            return 200, _JSON, _json(await self.purge(doc))
        if path == "/verify":
            return 200, _JSON, _json(await self.verify(doc))
        raise BadRequest(f"no such endpoint {path[:100]!r}", status_hint=404)

    async def _read(self, req: Request, path: str) -> tuple[int, str, bytes]:
        """Answer a GET or HEAD."""
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.render_metrics().encode()
        if path == "/summary" and parse_qs(urlsplit(req.target).query).get("cluster") == ["1"]:
            others = await self.cache.upstream.peers.summaries(self.config.admin_token)
            return 200, _JSON, _json(cluster_summary(self.summary(), others))
        if path == "/summary":
            return 200, _JSON, _json(self.summary())
        if path == "/health":
            health = self.health()
            return (200 if health["ready"] else 503), _JSON, _json(health)
        if path.startswith("/warm/"):
            job = self.warm_jobs.get(path[len("/warm/") :])
            if job is None:
                raise BadRequest(f"no warm job {path[6:100]!r}", status_hint=404)
            return 200, _JSON, _json(job.as_json())
        if path in ("/", "/index.html"):
            page = resources.files("mcc.ops").joinpath("status.html").read_bytes()
            return 200, "text/html; charset=utf-8", page
        raise BadRequest(f"no such page {path[:100]!r}", status_hint=404)

    def _start_warm_request(self, doc: dict[str, Any]) -> WarmJob:
        """Check a ``POST /warm`` body and start its job.

        Raises:
          BadRequest: 400 for a malformed list or URL, 403 for a URL not allowed,
            413 for too many URLs, 503 when too many jobs run.
        """
        urls = doc.get("urls")
        if not isinstance(urls, list) or not urls:
            raise BadRequest('warm needs {"urls": ["http://...", ...]}')
        if len(urls) > MAX_WARM_URLS:
            raise BadRequest(
                f"warm takes at most {MAX_WARM_URLS} URLs at once, got {len(urls)}",
                status_hint=413,
            )
        for u in urls:
            self.cache.resolve(check_url(u, "urls[]"))  # 400/403 now, not in the job
        return self.start_warm(urls)

    # -- actions and reports (each in its own module) ------------------------------

    def start_warm(self, urls: list[str]) -> WarmJob:
        """Start a background warm job (owned by the admin server's nursery).

        Raises:
          BadRequest: 503 when too many warm jobs are running already.
        """
        assert self._nursery is not None
        return self.warm_jobs.start(self._nursery, urls)

    async def purge(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Purge by ``url``, ``prefix`` or ``pattern``; see :func:`mcc.ops.actions.purge`.

        Raises:
          BadRequest: 400 for a malformed target.
        """
        return await actions.purge(self.cache, doc)

    async def verify(self, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        """Check every blob of the running cache against its digest; with
        ``{"repair": true}``, quarantine corrupt blobs at once."""
        return await actions.verify(self.cache, doc or {})

    def health(self) -> dict[str, Any]:
        """Readiness: every drive writable, the index answering; parents listed."""
        return reports.health(self.cache)

    def summary(self) -> dict[str, Any]:
        """Hit/miss volume for the last 15 s and since start, and per-host volume."""
        return reports.summary(self.cache, self.metrics, self._open_connections)

    def render_metrics(self) -> str:
        """The Prometheus exposition of every counter (prometheus_client's text format)."""
        return render(self.registry)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=1).encode()


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
