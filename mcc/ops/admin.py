"""The admin listener: metrics, summary, health, warm, purge and a status page.

Endpoints:

- ``GET /metrics``: Prometheus text exposition.
- ``GET /summary``: JSON in the spirit of Connected Cache's summary report;
  ``?cluster=1`` adds up every peer's summary too (see :mod:`mcc.ops.cluster`).
- ``GET /health``: readiness JSON; 503 when a drive is not writable or the index fails.
- ``POST /warm`` ``{"urls": [...]}``: pre-seed in the background; ``GET /warm/<id>``
  shows its progress in objects and bytes (rate, time left).
- ``POST /purge`` ``{"url": ...}``, ``{"prefix": "http://..."}`` or
  ``{"pattern": "host, host:port or *.suffix"}``.
- ``POST /verify``: check every blob of the running cache (no repair).
- ``GET /``: an HTML status page that refreshes itself.

Rules, checked in this order on every request (theory: a browser on this machine must
never be a way in, neither by a cross-site request nor through DNS rebinding):

1. The Host header names this listener: its host and bound port, or the address the
   connection reached; on loopback also ``localhost``, ``127.0.0.1`` and ``[::1]``; on
   a wildcard listener also the machine's host name. Otherwise 421 (a page from
   ``evil.example`` whose name was rebound to 127.0.0.1 still sends ``Host: evil.example``).
2. A write (every method but GET and HEAD) with an ``Origin`` header from elsewhere is
   refused (403).
3. With ``admin_token`` set, writes need ``Authorization: Bearer TOKEN`` (401), and so
   does every request when the listener is not on loopback. With no token, writes need
   ``Content-Type: application/json`` and an ``X-MCC-Admin`` header (403 otherwise):
   neither can be sent cross-site without a CORS preflight, which this API never grants.
4. Bodies are bounded in size and JSON depth; URLs are checked before any work starts.
   Any unexpected exception becomes a 500 with one logged traceback and a count in
   ``mcc_internal_errors_total{where="admin"}``; the listener and the node go on.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from ..config import Config
from ..engine.engine import Cache
from ..errors import BadRequest, McError
from ..http.protocol import CLOSED, END_OF_BODY, NEED_DATA, Request, ServerProtocol
from ..origins import split_host_port
from ..store.verify import verify_cache
from .client import ADMIN_HEADER
from .cluster import cluster_summary
from .collector import CONTENT_TYPE, node_registry, render
from .metrics import WINDOW_SECONDS, Metrics
from .purge import PurgeTarget

__all__ = ["AdminServer"]

log = logging.getLogger("mcc.admin")

# Largest admin request body (a warm list of a few thousand URLs fits); larger gets 413.
_MAX_BODY = 1024 * 1024
# Deepest JSON accepted. The documents are two levels deep ({"urls": [...]}); the bound
# keeps a hostile body from exhausting the parser's stack (json raises RecursionError
# near 1,000 levels) and the walk that checks it short.
_MAX_JSON_DEPTH = 8
# Longest URL accepted by warm and purge: the client listener's default max_request_head.
_MAX_URL = 16 * 1024
# URLs in one warm job (a 1 MiB body of short URLs would be ~20,000).
_MAX_WARM_URLS = 10_000
# Warm jobs remembered for GET /warm/<id>.
_MAX_JOBS = 100
# Warm jobs running at once; more get 503 (each holds its URL list until it ends).
_MAX_RUNNING_JOBS = 16
# Methods that change nothing; every other method is a write and guarded as one.
_SAFE_METHODS = ("GET", "HEAD")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_LOOPBACK_NAMES = frozenset(_LOOPBACK)
_WILDCARD = ("0.0.0.0", "::", "")


@attrs.define
class WarmJob:
    """One POST /warm request's progress, in objects and in bytes."""

    id: str
    urls: list[str]
    done: int = 0
    failed: int = 0
    bytes: int = 0  # read so far (from the store or upstream), updated as blocks arrive
    total_bytes: int = 0  # the sizes of the URLs found so far
    state: str = "running"
    errors: list[str] = attrs.field(factory=list)
    started: float = attrs.field(factory=time.monotonic)
    ended: float | None = None

    def as_json(self) -> dict[str, Any]:
        elapsed = (self.ended or time.monotonic()) - self.started
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        left = self.total_bytes - self.bytes
        return {
            "id": self.id,
            "total": len(self.urls),
            "done": self.done,
            "failed": self.failed,
            "bytes": self.bytes,
            "totalBytes": self.total_bytes,
            "bytesPerSecond": round(rate),
            "etaSeconds": round(left / rate, 1) if rate and self.state == "running" else None,
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
        self.metrics = metrics
        self._open_connections = open_connections
        # this node's collector in a registry of its own (not prometheus_client's global)
        self.registry = node_registry(cache, metrics, open_connections)
        self.jobs: dict[str, WarmJob] = {}
        self._running_jobs = 0
        self._nursery: trio.Nursery | None = None
        self.port = 0
        self._names = self._listener_names()

    @property
    def config(self) -> Config:
        """The config in force (the engine's: a reload on SIGHUP replaces it)."""
        return self.cache.config

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
        names = self._names | _local_names(stream)
        try:
            while True:
                with trio.move_on_after(self.config.timeouts.keepalive) as idle:
                    req, body = await _read_request(proto, stream)
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
            self._internal_error("admin", "admin connection")
        finally:
            await stream.aclose()

    async def _answer(
        self, req: Request, body: bytes, names: frozenset[str]
    ) -> tuple[int, str, bytes]:
        """Route one request; every failure becomes a status, none escapes."""
        try:
            return await self._route(req, body, names)
        except BadRequest as exc:
            return exc.status_hint, "application/json", _json_error(str(exc))
        except Exception:
            self._internal_error("admin", f"admin {req.method} {req.target[:200]!r}")
            return 500, "application/json", _json_error("internal error (logged on the node)")

    def _internal_error(self, where: str, what: str) -> None:
        """Count and log the exception being handled (call inside ``except``)."""
        if where == "warm":
            self.metrics.internal_errors.warm += 1
        else:
            self.metrics.internal_errors.admin += 1
        log.error("%s failed with an internal error", what, exc_info=True)

    # -- who may ask ---------------------------------------------------------------

    def _listener_names(self) -> frozenset[str]:
        """Host names (normalised, no port) that name this listener on any connection."""
        host = self.config.admin_listen.host
        names: set[str] = set()
        if host in _WILDCARD:
            try:
                names.add(split_host_port(socket.gethostname(), 0)[0])
            except ValueError:
                pass
        else:
            names.add(host)
            if _is_loopback(host):
                names |= _LOOPBACK_NAMES
        return frozenset(names)

    def _check_host(self, req: Request, names: frozenset[str]) -> None:
        """Refuse a Host header that does not name this listener (DNS rebinding)."""
        given = [v for k, v in req.headers if k == "host"]
        if len(given) != 1:
            raise BadRequest("the admin API needs exactly one Host header")
        if not self._names_us(given[0], names):
            raise BadRequest(
                f"Host {given[0][:100]!r} does not name this admin listener "
                f"({_authority(self.config.admin_listen.host, self.port)}); refused "
                "as a guard against DNS rebinding",
                status_hint=421,
            )

    def _names_us(self, authority: str, names: frozenset[str]) -> bool:
        try:
            host, port = split_host_port(authority, 80)
        except ValueError:
            return False
        return port == self.port and host in names

    def _check_write(self, req: Request, path: str, names: frozenset[str]) -> None:
        """A write must come from a client that is not a browser tricked by a page."""
        origin = req.header("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme != "http" or not self._names_us(parts.netloc, names):
                raise BadRequest(
                    f"{req.method} {path} from Origin {origin[:100]!r} refused: "
                    "the admin API takes no cross-site writes",
                    status_hint=403,
                )
        token = self.config.admin_token
        if token:
            if not _bearer_matches(req, token):
                raise BadRequest("missing or wrong admin token", status_hint=401)
            return
        ctype = (req.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json" or not req.header(ADMIN_HEADER.lower()):
            raise BadRequest(
                f"{req.method} {path} needs Content-Type: application/json and an "
                f"{ADMIN_HEADER} header (no admin_token is set; browsers cannot send "
                "these cross-site)",
                status_hint=403,
            )

    def _read_allowed(self, req: Request) -> bool:
        token = self.config.admin_token
        if not token or self.config.admin_listen.host in _LOOPBACK:
            return True
        return _bearer_matches(req, token)

    async def _route(
        self, req: Request, body: bytes, names: frozenset[str]
    ) -> tuple[int, str, bytes]:
        path = urlsplit(req.target).path
        self._check_host(req, names)
        if req.method not in _SAFE_METHODS:
            self._check_write(req, path, names)
        elif not self._read_allowed(req):
            raise BadRequest("missing or wrong admin token", status_hint=401)
        if req.method not in ("GET", "HEAD", "POST"):
            raise BadRequest(f"{req.method} is not supported here", status_hint=405)
        if req.method in _SAFE_METHODS:
            if path == "/metrics":
                return 200, CONTENT_TYPE, self.render_metrics().encode()
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
                    raise BadRequest(f"no warm job {path[6:100]!r}", status_hint=404)
                return 200, "application/json", _json(job.as_json())
            if path in ("/", "/index.html"):
                page = resources.files("mcc.ops").joinpath("status.html").read_bytes()
                return 200, "text/html; charset=utf-8", page
            raise BadRequest(f"no such page {path[:100]!r}", status_hint=404)
        doc = _parse_json(body)
        if path == "/warm":
            urls = doc.get("urls")
            if not isinstance(urls, list) or not urls:
                raise BadRequest('warm needs {"urls": ["http://...", ...]}')
            if len(urls) > _MAX_WARM_URLS:
                raise BadRequest(
                    f"warm takes at most {_MAX_WARM_URLS} URLs at once, got {len(urls)}",
                    status_hint=413,
                )
            for u in urls:
                self.cache.resolve(_check_url(u, "urls[]"))  # 400/403 now, not in the job
            return 202, "application/json", _json(self.start_warm(urls).as_json())
        if path == "/purge":
            return 200, "application/json", _json(await self.purge(doc))
        if path == "/verify":
            return 200, "application/json", _json(await self.verify())
        raise BadRequest(f"no such endpoint {path[:100]!r}", status_hint=404)

    # -- actions -------------------------------------------------------------------

    def start_warm(self, urls: list[str]) -> WarmJob:
        """Start a background warm job (owned by the admin server's nursery).

        Raises:
          BadRequest: 503 when ``_MAX_RUNNING_JOBS`` jobs are running already.
        """
        assert self._nursery is not None
        if self._running_jobs >= _MAX_RUNNING_JOBS:
            raise BadRequest(
                f"{self._running_jobs} warm jobs are running already; try again later",
                status_hint=503,
            )
        job = WarmJob(os.urandom(6).hex(), list(urls))
        self.jobs[job.id] = job
        while len(self.jobs) > _MAX_JOBS:
            del self.jobs[next(iter(self.jobs))]
        self._running_jobs += 1
        self._nursery.start_soon(self._warm, job)
        return job

    async def _warm(self, job: WarmJob) -> None:
        try:
            # sizes first (one discovery each), so that progress has a total in bytes
            sizes: dict[str, int] = {}
            for url in job.urls:
                try:
                    sizes[url] = (await self.cache.stat(url)).size
                    job.total_bytes += sizes[url]
                except McError as exc:
                    job.failed += 1
                    job.errors.append(f"{url}: {exc}")
                except Exception as exc:  # a bug must not take the admin nursery down
                    self._internal_error("warm", f"warm {url[:200]!r}")
                    job.failed += 1
                    job.errors.append(f"{url}: internal error ({type(exc).__name__})")

            def progress(n: int) -> None:
                job.bytes += n

            for url in sizes:
                before = job.bytes
                try:
                    await self.cache.warm(url, progress)
                    job.done += 1
                except McError as exc:
                    job.failed += 1
                    job.errors.append(f"{url}: {exc}")
                    job.total_bytes -= sizes[url] - (job.bytes - before)
                except Exception as exc:  # a bug must not take the admin nursery down
                    self._internal_error("warm", f"warm {url[:200]!r}")
                    job.failed += 1
                    job.errors.append(f"{url}: internal error ({type(exc).__name__})")
                    job.total_bytes -= sizes[url] - (job.bytes - before)
        finally:
            self._running_jobs -= 1
            job.ended = time.monotonic()
            job.state = "done"

    async def purge(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Purge one URL (``url``), every object under a URL prefix (``prefix``), or
        every object whose host matches a pattern (``pattern``: host, host:port or
        *.suffix); see :mod:`mcc.ops.purge`.

        Raises:
          BadRequest: 400 for a malformed target.
        """
        url, prefix, pattern = doc.get("url"), doc.get("prefix"), doc.get("pattern")
        if url is not None:
            url = _check_url(url, "url")
            removed = [self.cache.resolve(url)] if await self.cache.purge(url) else []
            return {"purged": removed}
        if prefix is not None:
            text = _check_url(prefix, "prefix")
        elif pattern is not None:
            text = _check_pattern(pattern)
        else:
            raise BadRequest(
                'purge needs {"url": "http://..."}, {"prefix": "http://..."} or '
                '{"pattern": "host, host:port or *.suffix"}'
            )
        try:
            target = PurgeTarget.parse(text, self.cache.policy.canonical)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        removed = []
        for key in self.cache.index.object_keys():
            if target.matches(key):
                await self.cache.purge(key)
                removed.append(key)
        return {"purged": removed}

    async def verify(self) -> dict[str, Any]:
        """Check every blob of the running cache against its digest (no repair)."""
        drives = list(self.cache.blobs.drives)
        index_path = drives[0].root / "index.sqlite3"
        report = await trio.to_thread.run_sync(
            functools.partial(verify_cache, drives, index_path, lock=False)
        )
        return {
            "rows": report.rows(),
            "clean": report.clean,
            "corrupt": report.corrupt,
            "missing": report.missing,
        }

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
        total_hit = m.served.cache
        total_miss = m.served.upstream
        hit_req = m.requests.hit
        miss_req = m.requests.not_hit
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
        """The Prometheus exposition of every counter (prometheus_client's text format)."""
        return render(self.registry)


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


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, no deeper than ``_MAX_JSON_DEPTH``.

    Raises:
      BadRequest: 400 saying why the body is refused.
    """
    too_deep = f"body is JSON nested deeper than {_MAX_JSON_DEPTH} levels"
    try:
        doc = json.loads(body or b"{}")
    except RecursionError:
        raise BadRequest(too_deep) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    if _depth_exceeds(doc, _MAX_JSON_DEPTH):
        raise BadRequest(too_deep)
    return doc


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """True when containers in ``doc`` nest deeper than ``limit`` (no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _check_url(value: object, field: str) -> str:
    """``value`` if it is a plain ``http://`` or ``https://`` URL with nothing a request
    line cannot carry.

    Raises:
      BadRequest: 400 naming the field and the problem.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a URL string, got {type(value).__name__}")
    shown = repr(value[:200])
    if len(value) > _MAX_URL:
        raise BadRequest(f"{field}: URL longer than {_MAX_URL} characters")
    if not value.isascii():
        raise BadRequest(f"{field}: {shown} has non-ASCII characters (percent-encode them)")
    if any(c < " " or c == "\x7f" for c in value):
        raise BadRequest(f"{field}: {shown} has a control character")
    if " " in value:
        raise BadRequest(f"{field}: {shown} has a space (percent-encode it as %20)")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        raise BadRequest(f"{field}: {shown} is not an http:// or https:// URL")
    return value


def _check_pattern(value: object) -> str:
    """A purge host pattern: ``host`` or ``*.suffix``, printable ASCII without spaces.

    Raises:
      BadRequest: 400 naming the problem.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest('pattern: expected a host or "*.suffix" string')
    if len(value) > 255 or not value.isascii() or not value.isprintable() or " " in value:
        raise BadRequest(f"pattern: {value[:100]!r} is not a host or *.suffix pattern")
    return value


def _bearer_matches(req: Request, token: str) -> bool:
    given = req.header("authorization") or ""
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_names(stream: trio.SocketStream) -> frozenset[str]:
    """The address a connection reached (a client may name it in Host), plus the
    loopback names when that address is a loopback one."""
    try:
        address = ipaddress.ip_address(str(stream.socket.getsockname()[0]).split("%", 1)[0])
    except (OSError, ValueError, IndexError):
        return frozenset()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    names = {str(address)}
    if address.is_loopback:
        names |= _LOOPBACK_NAMES
    return frozenset(names)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
            declared = req.header("content-length") or ""
            if declared.isdigit() and int(declared) > _MAX_BODY:
                raise BadRequest(f"request body over {_MAX_BODY} bytes", status_hint=413)
        elif isinstance(event, bytes):
            body += event
            if len(body) > _MAX_BODY:
                raise BadRequest(f"request body over {_MAX_BODY} bytes", status_hint=413)
        elif event is END_OF_BODY:
            return req, body
