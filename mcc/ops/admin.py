"""The admin listener: metrics, summary, health, warm, purge and a status page.

Endpoints (``admin_token``, when set, is required as ``Authorization: Bearer TOKEN``
for the write endpoints, and for every endpoint when the listener is not on loopback):

- ``GET /metrics``: Prometheus text exposition.
- ``GET /summary``: JSON in the spirit of Connected Cache's summary report;
  ``?cluster=1`` adds up every peer's summary too (see :mod:`mcc.ops.cluster`).
- ``GET /health``: readiness JSON; 503 when a drive is not writable or the index fails.
- ``POST /warm`` ``{"urls": [...]}``: pre-seed in the background; ``GET /warm/<id>``.
- ``POST /purge`` ``{"url": ...}`` or ``{"pattern": "host or *.suffix"}``.
- ``GET /``: an HTML status page that refreshes itself.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from ..engine.engine import Cache
from ..errors import BadRequest, McError
from ..http.protocol import CLOSED, END_OF_BODY, NEED_DATA, Request, ServerProtocol
from .cluster import cluster_summary
from .metrics import DURATION_BUCKETS, WINDOW_SECONDS, Metrics, exposition

__all__ = ["AdminServer"]

log = logging.getLogger("mcc.admin")

# Largest admin request body (a warm list of a few thousand URLs fits).
_MAX_BODY = 1024 * 1024
# Warm jobs remembered for GET /warm/<id>.
_MAX_JOBS = 100
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


@attrs.define
class WarmJob:
    """One POST /warm request's progress."""

    id: str
    urls: list[str]
    done: int = 0
    failed: int = 0
    bytes: int = 0
    state: str = "running"
    errors: list[str] = attrs.field(factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "total": len(self.urls),
            "done": self.done,
            "failed": self.failed,
            "bytes": self.bytes,
            "state": self.state,
            "errors": self.errors[-20:],
        }


class AdminServer:
    """Serves the admin API.

    Args:
      cache: the engine.
      metrics: the HTTP server's response counters.
      open_connections: a function returning the number of client connections.
    """

    def __init__(self, cache: Cache, metrics: Metrics, open_connections: Callable[[], int]) -> None:
        self.cache = cache
        self.config = cache.config
        self.metrics = metrics
        self._open_connections = open_connections
        self.jobs: dict[str, WarmJob] = {}
        self._nursery: trio.Nursery | None = None
        self.port = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``admin_listen`` until cancelled; started() gets the bound port.

        Raises:
          OSError: the address cannot be bound (message names it).
        """
        addr = self.config.admin_listen
        try:
            listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
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
        try:
            while True:
                with trio.move_on_after(self.config.timeouts.keepalive) as idle:
                    req, body = await _read_request(proto, stream)
                if idle.cancelled_caught or req is None:
                    return
                try:
                    status, ctype, payload = await self._route(req, body)
                except BadRequest as exc:
                    status, ctype = exc.status_hint, "application/json"
                    payload = json.dumps({"error": str(exc)}).encode()
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
        finally:
            await stream.aclose()

    def _authorized(self, req: Request, write: bool) -> bool:
        token = self.config.admin_token
        if not token:
            return True
        if not write and self.config.admin_listen.host in _LOOPBACK:
            return True
        given = req.header("authorization") or ""
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    async def _route(self, req: Request, body: bytes) -> tuple[int, str, bytes]:
        path = urlsplit(req.target).path
        write = req.method == "POST"
        if req.method not in ("GET", "HEAD", "POST"):
            raise BadRequest(f"{req.method} is not supported here", status_hint=405)
        if not self._authorized(req, write):
            raise BadRequest("missing or wrong admin token", status_hint=401)
        if req.method in ("GET", "HEAD"):
            if path == "/metrics":
                return (
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.render_metrics().encode(),
                )
            if path == "/summary" and parse_qs(urlsplit(req.target).query).get("cluster") == ["1"]:
                others = await self.cache.upstream.peers.summaries(self.config.admin_token)
                return 200, "application/json", _json(cluster_summary(self.summary(), others))
            if path == "/summary":
                return 200, "application/json", _json(self.summary())
            if path == "/health":
                health = self.health()
                return (200 if health["ready"] else 503), "application/json", _json(health)
            if path.startswith("/warm/"):
                job = self.jobs.get(path[len("/warm/") :])
                if job is None:
                    raise BadRequest(f"no warm job {path[6:]!r}", status_hint=404)
                return 200, "application/json", _json(job.as_json())
            if path in ("/", "/index.html"):
                page = resources.files("mcc.ops").joinpath("status.html").read_bytes()
                return 200, "text/html; charset=utf-8", page
            raise BadRequest(f"no such page {path!r}", status_hint=404)
        doc = _parse_json(body)
        if path == "/warm":
            urls = doc.get("urls")
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise BadRequest('warm needs {"urls": ["http://...", ...]}')
            for u in urls:
                self.cache.resolve(u)  # 400/403 now, not later in the job
            return 202, "application/json", _json(self.start_warm(urls).as_json())
        if path == "/purge":
            return 200, "application/json", _json(await self.purge(doc))
        raise BadRequest(f"no such endpoint {path!r}", status_hint=404)

    # -- actions -------------------------------------------------------------------

    def start_warm(self, urls: list[str]) -> WarmJob:
        """Start a background warm job (owned by the admin server's nursery)."""
        assert self._nursery is not None
        job = WarmJob(os.urandom(6).hex(), list(urls))
        self.jobs[job.id] = job
        while len(self.jobs) > _MAX_JOBS:
            del self.jobs[next(iter(self.jobs))]
        self._nursery.start_soon(self._warm, job)
        return job

    async def _warm(self, job: WarmJob) -> None:
        for url in job.urls:
            try:
                info = await self.cache.warm(url)
                job.bytes += info.size
                job.done += 1
            except McError as exc:
                job.failed += 1
                job.errors.append(f"{url}: {exc}")
        job.state = "done"

    async def purge(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Purge one URL or every object whose host matches a pattern."""
        url, pattern = doc.get("url"), doc.get("pattern")
        if isinstance(url, str):
            removed = [url] if await self.cache.purge(url) else []
        elif isinstance(pattern, str) and pattern:
            removed = []
            for key in self.cache.index.object_keys():
                host = urlsplit(key).hostname or ""
                if fnmatch.fnmatchcase(host, pattern.lower()) or host == pattern.lower():
                    await self.cache.purge(key)
                    removed.append(key)
        else:
            raise BadRequest('purge needs {"url": "http://..."} or {"pattern": "host"}')
        return {"purged": removed}

    # -- reports -------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Readiness: every drive writable, the index answering; parents listed."""
        drives = []
        for d in self.cache.blobs.drives:
            ok = True
            probe = d.root / "tmp" / f".health.{os.getpid()}"
            try:
                probe.write_bytes(b"ok")
                probe.unlink()
            except OSError:
                ok = False
            drives.append({"path": str(d.root), "writable": ok})
        try:
            self.cache.index.stored_bytes()
            index_ok = True
        except Exception:
            index_ok = False
        parents = self.cache.upstream.parent_health()
        ready = index_ok and all(d["writable"] for d in drives)
        return {"ready": ready, "drives": drives, "index": index_ok, "parents": parents}

    def summary(self) -> dict[str, Any]:
        """Hit/miss volume for the last 15 s and since start, and per-host volume."""
        m = self.metrics
        recent = m.window(WINDOW_SECONDS)
        total_hit = m.bytes_by_source["cache"]
        total_miss = m.bytes_by_source["upstream"]
        hit_req = m.requests["hit"]
        miss_req = sum(m.requests[k] for k in ("miss", "partial", "pass"))
        stats = self.cache.statistics()
        return {
            "nodeId": self.config.node_id,
            "uptimeSeconds": round(time.time() - m.started, 1),
            "last15s": _ratios(
                recent["hitBytes"],
                recent["missBytes"],
                recent["hitRequests"],
                recent["missRequests"],
            ),
            "sinceStart": _ratios(total_hit, total_miss, hit_req, miss_req),
            "egressBytes": total_hit + total_miss,
            "upstreamBytes": self.cache.upstream.bytes_received,
            "hosts": dict(sorted(m.bytes_by_host.items(), key=lambda kv: -kv[1])[:50]),
            "topObjects": dict(sorted(m.bytes_by_url.items(), key=lambda kv: -kv[1])[:20]),
            "throughput": m.history(300),
            "drives": [
                {
                    "path": str(d.root),
                    "bytes": self.cache.index.stored_bytes_on(i),
                    "capacity": d.max_size,
                }
                for i, d in enumerate(self.cache.blobs.drives)
            ],
            "parents": self.cache.upstream.parent_health(),
            "peers": self.cache.upstream.peers.health(),
            "peerServedBytes": self.cache.upstream.peers.served_bytes,
            "peerReceivedBytes": self.cache.upstream.peers.received_bytes,
            "flightJoins": stats.flight_joins,
            "openConnections": self._open_connections(),
        }

    def render_metrics(self) -> str:
        """The Prometheus exposition of every counter."""
        m = self.metrics
        stats = self.cache.statistics()
        up = self.cache.upstream
        cum = 0
        hist: list[tuple[dict[str, str], float]] = []
        for bound, n in zip((*DURATION_BUCKETS, float("inf")), m.buckets, strict=True):
            cum += n
            hist.append(({"le": "+Inf" if bound == float("inf") else repr(bound)}, cum))
        drives = self.cache.blobs.drives
        families: list[tuple[str, str, str, list[tuple[dict[str, str], float]]]] = [
            (
                "mcc_requests_total",
                "counter",
                "Responses by cache outcome.",
                [
                    ({"cache": k}, m.requests[k])
                    for k in ("hit", "miss", "partial", "pass", "error")
                ],
            ),
            (
                "mcc_served_bytes_total",
                "counter",
                "Body bytes sent to clients by source.",
                [({"source": k}, m.bytes_by_source[k]) for k in ("cache", "upstream")],
            ),
            (
                "mcc_upstream_requests_total",
                "counter",
                "Upstream requests by upstream and outcome.",
                [({"upstream": u, "outcome": o}, n) for (u, o), n in sorted(up.outcomes.items())],
            ),
            (
                "mcc_upstream_bytes_total",
                "counter",
                "Body bytes received from upstream.",
                [({}, up.bytes_received)],
            ),
            (
                "mcc_flight_joins_total",
                "counter",
                "Requests that joined a fetch already in flight.",
                [({}, stats.flight_joins)],
            ),
            (
                "mcc_store_bytes",
                "gauge",
                "Bytes stored per cache drive.",
                [
                    ({"drive": str(d.root)}, self.cache.index.stored_bytes_on(i))
                    for i, d in enumerate(drives)
                ],
            ),
            (
                "mcc_store_capacity_bytes",
                "gauge",
                "max_size per cache drive.",
                [({"drive": str(d.root)}, d.max_size) for d in drives],
            ),
            (
                "mcc_evictions_total",
                "counter",
                "Blocks evicted to keep drives under max_size.",
                [({}, stats.evictions)],
            ),
            (
                "mcc_corrupt_blocks_total",
                "counter",
                "Blobs that failed verification.",
                [({}, stats.corrupt_blocks)],
            ),
            (
                "mcc_store_failures_total",
                "counter",
                "Blocks that could not be written (ENOSPC...).",
                [({}, stats.store_failures)],
            ),
            (
                "mcc_open_connections",
                "gauge",
                "Client connections open now.",
                [({}, self._open_connections())],
            ),
            (
                "mcc_parent_up",
                "gauge",
                "1 when a parent cache is considered up.",
                [({"parent": p}, 1 if ok else 0) for p, ok in up.parent_health().items()],
            ),
        ]
        text = exposition(families)
        text += "# HELP mcc_request_duration_seconds Time to answer a request.\n"
        text += "# TYPE mcc_request_duration_seconds histogram\n"
        for labels, value in hist:
            text += f'mcc_request_duration_seconds_bucket{{le="{labels["le"]}"}} {int(value)}\n'
        text += f"mcc_request_duration_seconds_sum {m.duration_sum!r}\n"
        text += f"mcc_request_duration_seconds_count {m.duration_count}\n"
        return text


def _ratios(hit_bytes: int, miss_bytes: int, hit_req: int, miss_req: int) -> dict[str, Any]:
    total_b, total_r = hit_bytes + miss_bytes, hit_req + miss_req
    return {
        "hitBytes": hit_bytes,
        "missBytes": miss_bytes,
        "hitRequests": hit_req,
        "missRequests": miss_req,
        "hitRatioBytes": round(hit_bytes / total_b, 4) if total_b else None,
        "hitRatioRequests": round(hit_req / total_r, 4) if total_r else None,
    }


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=1).encode()


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


async def _read_request(
    proto: ServerProtocol, stream: trio.SocketStream
) -> tuple[Request | None, bytes]:
    req: Request | None = None
    body = b""
    while True:
        event = proto.next_event()
        if event is NEED_DATA:
            proto.receive_data(await stream.receive_some(65536))
        elif event is CLOSED:
            return None, b""
        elif isinstance(event, Request):
            req = event
        elif isinstance(event, bytes):
            body += event
            if len(body) > _MAX_BODY:
                raise BadRequest("request body too large", status_hint=413)
        elif event is END_OF_BODY:
            return req, body
