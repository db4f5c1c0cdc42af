"""From a request to the origin URL it asks for. Pure; the allowlist is checked by the engine.

The four forms, tried in order:

1. Delivery Optimization: ``GET /path?query&cacheHostOrigin=HOST`` ->
   ``http://HOST/path?query`` (the parameter removed).
2. Forward proxy (apt, ``curl -x``, a child mcc): ``GET http[s]://HOST[:PORT]/path``.
3. Host header (DNS redirection): ``Host: HOST`` that is not one of this node's names.
4. Reverse proxy: with ``origin`` configured, ``origin + path?query``.

Forms 1 and 3 name only a host; ``scheme_for(host, port)`` (the allowlist's
``https://`` marks) says whether it is fetched over https, on port 443 unless another
port was named.

Anything else names no origin: 400.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, urlencode

import attrs

from ..errors import BadRequest
from ..origins import split_host_port

__all__ = ["OwnNames", "Route", "RouteMemo", "host_of", "route_request"]

_DO_PARAM = "cachehostorigin"
# Routes a RouteMemo keeps (it starts again when full), and the longest target kept.
_MEMO_ROUTES = 4096
_MEMO_TARGET_MAX = 1024


@attrs.frozen
class Route:
    """Where a request goes: the absolute origin URL and which form named it."""

    url: str
    form: str  # "do", "proxy", "host", "origin"


@attrs.frozen
class OwnNames:
    """The names and addresses this node answers to, for the Host-header form."""

    hosts: frozenset[str]
    ports: frozenset[int]

    @classmethod
    def build(cls, listen: Iterable[tuple[str, int]], node_id: str) -> OwnNames:
        """From the listen addresses plus the usual local names."""
        hosts = {"localhost", "127.0.0.1", "::1", node_id.lower()}
        try:
            hostname = socket.gethostname().lower()
            hosts |= {hostname, hostname.split(".")[0], socket.getfqdn().lower()}
        except OSError:
            pass
        ports = set()
        for host, port in listen:
            ports.add(port)
            if host not in ("0.0.0.0", "::", ""):
                hosts.add(host.lower())
        return cls(frozenset(hosts), frozenset(ports))

    def owns(self, host: str, port: int | None) -> bool:
        """True when ``Host: host[:port]`` names this node."""
        return host in self.hosts and (port is None or port in self.ports)


def route_request(
    target: str,
    host_header: str | None,
    own: OwnNames,
    origin: str | None,
    scheme_for: Callable[[str, int], str] | None = None,
) -> Route:
    """The origin URL a request names.

    Args:
      target: the request-target as sent.
      host_header: the Host header's value, if any.
      own: this node's names.
      origin: the configured default origin URL (reverse-proxy form), or None.
      scheme_for: ``(host, port) -> "http" | "https"`` for the forms naming only a
        host; None means http.

    Raises:
      BadRequest: 400 when the target is malformed or names no origin.
    """
    if target.startswith("/"):
        path, sep, query = target.partition("?")
        if sep:
            pairs = parse_qsl(query, keep_blank_values=True)
            hosts = [v for k, v in pairs if k.lower() == _DO_PARAM]
            if hosts:
                if len(hosts) > 1 or not hosts[0]:
                    raise BadRequest("cacheHostOrigin must appear once with a host")
                host, port = _authority(hosts[0])
                rest = [(k, v) for k, v in pairs if k.lower() != _DO_PARAM]
                new_query = "?" + urlencode(rest) if rest else ""
                return Route(f"{_origin(host, port, scheme_for)}{path}{new_query}", "do")
        if host_header:
            host, maybe_port = _host_header(host_header)
            if not own.owns(host, maybe_port):
                return Route(f"{_origin(host, maybe_port or 80, scheme_for)}{target}", "host")
        if origin:
            return Route(origin.rstrip("/") + target, "origin")
        raise BadRequest("the request names no origin (no cacheHostOrigin, absolute URL or Host)")
    lowered = target[:8].lower()
    if lowered.startswith("http://"):
        authority, slash, path = target[7:].partition("/")
        host, port = _authority(authority)
        return Route(f"http://{_join(host, port)}/{path if slash else ''}", "proxy")
    if lowered.startswith("https://"):
        authority, slash, path = target[8:].partition("/")
        host, maybe_port = _host_header(authority)
        port = 443 if maybe_port is None else maybe_port
        return Route(f"https://{_join(host, port, 443)}/{path if slash else ''}", "proxy")
    raise BadRequest(f"request target {target[:100]!r} is not a path or an http(s):// URL")


def _host_header(text: str) -> tuple[str, int | None]:
    try:
        host, port = split_host_port(text.strip(), default_port=-1)
    except ValueError as exc:
        raise BadRequest(f"bad host: {exc}") from None
    return host, (None if port < 0 else port)


def _authority(text: str) -> tuple[str, int]:
    host, port = _host_header(text)
    return host, 80 if port is None else port


def _origin(host: str, port: int, scheme_for: Callable[[str, int], str] | None) -> str:
    """``scheme://authority`` for a request naming only ``host:port`` (80 if unnamed)."""
    if scheme_for is not None and scheme_for(host, port) == "https":
        return f"https://{_join(host, 443 if port == 80 else port, 443)}"
    return f"http://{_join(host, port)}"


def _join(host: str, port: int, default_port: int = 80) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == default_port else f"{h}:{port}"


class RouteMemo:
    """Routes already worked out, by (target, Host): a hit repeats a few targets.
    Clear it when anything else :func:`route_request` reads changes (a reload, the
    ports bound); refusals are not kept."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str | None], Route] = {}

    def clear(self) -> None:
        """Forget every route."""
        self._routes.clear()

    def route(
        self,
        target: str,
        host_header: str | None,
        own: OwnNames,
        origin: str | None,
        scheme_for: Callable[[str, int], str] | None = None,
    ) -> Route:
        """:func:`route_request`, remembered.

        Raises:
          BadRequest: as route_request.
        """
        key = (target, host_header)
        found = self._routes.get(key)
        if found is not None:
            return found
        found = route_request(target, host_header, own, origin, scheme_for)
        if len(target) <= _MEMO_TARGET_MAX:
            if len(self._routes) >= _MEMO_ROUTES:
                self._routes.clear()
            self._routes[key] = found
        return found


def host_of(url: str) -> str | None:
    """The ``host[:port]`` of an http(s) URL, or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return rest.split("/", 1)[0] or None
