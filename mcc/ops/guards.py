"""Who may ask the admin API, and what a request may carry.

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

Rules 1-3 are :func:`check_request`; rule 4 is :func:`read_request`,
:func:`parse_json`, :func:`check_url` and :func:`check_pattern`. Every refusal is a
:class:`~mcc.errors.BadRequest` carrying its status.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import trio

from ..config import Config
from ..errors import BadRequest
from ..headers import is_digits
from ..http.protocol import CLOSED, END_OF_BODY, NEED_DATA, Request, ServerProtocol
from ..origins import split_host_port
from .client import ADMIN_HEADER

__all__ = [
    "MAX_BODY",
    "MAX_JSON_DEPTH",
    "MAX_URL",
    "SAFE_METHODS",
    "check_pattern",
    "check_request",
    "check_url",
    "listener_names",
    "local_names",
    "parse_json",
    "read_request",
]

# Largest admin request body (a warm list of a few thousand URLs fits); larger gets 413.
MAX_BODY = 1024 * 1024
# Deepest JSON accepted. The documents are two levels deep ({"urls": [...]}); the bound
# keeps a hostile body from exhausting the parser's stack (json raises RecursionError
# near 1,000 levels) and the walk that checks it short.
MAX_JSON_DEPTH = 8
# Longest URL accepted by warm and purge: the client listener's default max_request_head.
MAX_URL = 16 * 1024
# Methods that change nothing; every other method is a write and guarded as one.
SAFE_METHODS = ("GET", "HEAD")
_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_LOOPBACK_NAMES = frozenset(_LOOPBACK)
_WILDCARD = ("0.0.0.0", "::", "")


# -- rules 1-3: who may ask ----------------------------------------------------------


def check_request(
    req: Request, path: str, names: frozenset[str], *, port: int, config: Config
) -> None:
    """Apply rules 1-3 to one request.

    Args:
      req: the request.
      path: its target's path (for messages).
      names: the host names that name this listener on this connection
        (:func:`listener_names` with :func:`local_names`).
      port: the port the admin listener is bound to.
      config: the config in force (``admin_listen``, ``admin_token``).

    Raises:
      BadRequest: 421 for a foreign Host, 403 for a cross-site or unmarked write,
        401 for a missing or wrong token.
    """
    _check_host(req, names, port, config)
    if req.method not in SAFE_METHODS:
        _check_write(req, path, names, port, config)
    elif not _read_allowed(req, config):
        raise BadRequest("missing or wrong admin token", status_hint=401)


def listener_names(config: Config) -> frozenset[str]:
    """Host names (normalised, no port) that name the admin listener on any connection."""
    host = config.admin_listen.host
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


def local_names(stream: trio.SocketStream) -> frozenset[str]:
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


def _check_host(req: Request, names: frozenset[str], port: int, config: Config) -> None:
    """Refuse a Host header that does not name this listener (DNS rebinding)."""
    given = [v for k, v in req.headers if k == "host"]
    if len(given) != 1:
        raise BadRequest("the admin API needs exactly one Host header")
    if not _names_us(given[0], names, port):
        raise BadRequest(
            f"Host {given[0][:100]!r} does not name this admin listener "
            f"({_authority(config.admin_listen.host, port)}); refused "
            "as a guard against DNS rebinding",
            status_hint=421,
        )


def _names_us(authority: str, names: frozenset[str], port: int) -> bool:
    try:
        host, given_port = split_host_port(authority, 80)
    except ValueError:
        return False
    return given_port == port and host in names


def _check_write(req: Request, path: str, names: frozenset[str], port: int, config: Config) -> None:
    """A write must come from a client that is not a browser tricked by a page."""
    origin = req.header("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme != "http" or not _names_us(parts.netloc, names, port):
            raise BadRequest(
                f"{req.method} {path} from Origin {origin[:100]!r} refused: "
                "the admin API takes no cross-site writes",
                status_hint=403,
            )
    token = config.admin_token
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


def _read_allowed(req: Request, config: Config) -> bool:
    token = config.admin_token
    if not token or config.admin_listen.host in _LOOPBACK:
        return True
    return _bearer_matches(req, token)


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


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- rule 4: what a request may carry ------------------------------------------------


async def read_request(
    proto: ServerProtocol, stream: trio.SocketStream
) -> tuple[Request | None, bytes]:
    """The next request on ``stream`` and its body; (None, b"") when the peer closed.

    Raises:
      BadRequest: 413 for a body over :data:`MAX_BODY` (declared or sent), or the
        status h11 suggests for a malformed request.
    """
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
            if is_digits(declared) and int(declared) > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes", status_hint=413)
        elif isinstance(event, bytes):
            body += event
            if len(body) > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes", status_hint=413)
        elif event is END_OF_BODY:
            return req, body


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, no deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
      BadRequest: 400 saying why the body is refused.
    """
    too_deep = f"body is JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        doc = json.loads(body or b"{}")
    except RecursionError:
        raise BadRequest(too_deep) from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    if _depth_exceeds(doc, MAX_JSON_DEPTH):
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


def check_url(value: object, field: str) -> str:
    """``value`` if it is a plain ``http://`` or ``https://`` URL with nothing a request
    line cannot carry.

    Raises:
      BadRequest: 400 naming the field and the problem.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a URL string, got {type(value).__name__}")
    shown = repr(value[:200])
    if len(value) > MAX_URL:
        raise BadRequest(f"{field}: URL longer than {MAX_URL} characters")
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


def check_pattern(value: object) -> str:
    """A purge host pattern: ``host`` or ``*.suffix``, printable ASCII without spaces.

    Raises:
      BadRequest: 400 naming the problem.
    """
    if not isinstance(value, str) or not value:
        raise BadRequest('pattern: expected a host or "*.suffix" string')
    if len(value) > 255 or not value.isascii() or not value.isprintable() or " " in value:
        raise BadRequest(f"pattern: {value[:100]!r} is not a host or *.suffix pattern")
    return value
