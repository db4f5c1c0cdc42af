"""Which origin hosts mcc serves, and the names it files them under.

mcc is never an open proxy: a request is served only when its origin host matches
an allowlist pattern. A pattern is ``host``, ``host:port`` or ``*.suffix`` (which
matches any name ending in ``.suffix`` but not ``suffix`` itself). A pattern
without a port matches ports 80 and 443 only, the ports real mirrors use; name the
port to allow any other. A pattern written ``https://host`` (any of the forms after
``https://``) also says that the host is fetched over TLS when a request names only
the host (the ``cacheHostOrigin=`` and Host-header forms): port 80, or no port, then
means 443.

``DEFAULT_ALLOW_ORIGINS`` holds the content endpoints that Microsoft Connected
Cache caches for Delivery Optimization clients. Source: "Microsoft Connected Cache
content and services endpoints",
https://learn.microsoft.com/windows/deployment/do/delivery-optimization-endpoints
(content rows; the service and management endpoints are not content and are left out).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import attrs

from .headers import is_digits

__all__ = [
    "DEFAULT_ALLOW_ORIGINS",
    "OriginPolicy",
    "is_internal_address",
    "normalize_host",
    "split_host_port",
]

DEFAULT_ALLOW_ORIGINS: tuple[str, ...] = (
    # Windows Update, Microsoft Store, Edge and Delivery Optimization content
    "*.windowsupdate.com",
    "*.dl.delivery.mp.microsoft.com",
    "*.delivery.mp.microsoft.com",
    "*.do.dsp.mp.microsoft.com",
    "emdl.ws.microsoft.com",
    # Office Click-to-Run / Microsoft 365 Apps CDN
    "officecdn.microsoft.com",
    "*.officecdn.microsoft.com",
    "officecdn.microsoft.com.edgesuite.net",
    "*.officecdn.microsoft.com.edgesuite.net",
    # Intune Win32 apps
    "swda01-mscdn.manage.microsoft.com",
    "swda02-mscdn.manage.microsoft.com",
    "swdb01-mscdn.manage.microsoft.com",
    "swdb02-mscdn.manage.microsoft.com",
    "swdc01-mscdn.manage.microsoft.com",
    "swdc02-mscdn.manage.microsoft.com",
    "swdd01-mscdn.manage.microsoft.com",
    "swdd02-mscdn.manage.microsoft.com",
    "swdin01-mscdn.manage.microsoft.com",
    "swdin02-mscdn.manage.microsoft.com",
    # Microsoft Defender definition updates
    "definitionupdates.microsoft.com",
    # Device Update for IoT Hub
    "*.dl.adu.microsoft.com",
)

_DEFAULT_PORTS = (80, 443)
# DNS limits (RFC 1035 s2.3.4): a name of at most 253 characters in text form, labels of 1-63.
_MAX_NAME = 253
_MAX_LABEL = 63


def split_host_port(
    authority: str, default_port: int = 80, *, allow_zero: bool = False
) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 in brackets) into a normalised host and a port.

    ``allow_zero`` admits port 0 (a listener on an ephemeral port).

    Raises:
      ValueError: naming the authority when it is malformed.
    """
    if "@" in authority:
        raise ValueError(f"{authority!r} carries userinfo, which is not allowed")
    host, port = authority, default_port
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"{authority!r} has an unclosed IPv6 bracket")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{authority!r} is not host[:port]")
            port = _parse_port(rest[1:], authority, allow_zero)
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
        port = _parse_port(port_text, authority, allow_zero)
    elif ":" in authority:
        raise ValueError(f"{authority!r} is not host[:port] (IPv6 needs brackets)")
    return normalize_host(host), port


def _parse_port(text: str, authority: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not is_digits(text) or not low <= int(text) < 65536:
        raise ValueError(f"{authority!r} has an invalid port {text!r}")
    return int(text)


def normalize_host(host: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode; reject anything that is not a host.

    Raises:
      ValueError: naming the host when it cannot be a DNS name or an IP literal.
    """
    h = host.strip().rstrip(".").lower() if host.endswith(".") else host.strip().lower()
    if not h:
        raise ValueError("empty host")
    if ":" in h:  # an IPv6 literal (brackets already removed)
        if not all(c in "0123456789abcdef:." for c in h):
            raise ValueError(f"{host!r} is not a valid IPv6 address")
        return h
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{host!r} is not a valid host name") from exc
    if any(not (c.isalnum() or c in "-._") for c in h):
        raise ValueError(f"{host!r} is not a valid host name")
    if len(h) > _MAX_NAME:
        raise ValueError(f"host name of {len(h)} characters is longer than {_MAX_NAME}")
    for label in h.split("."):
        # RFC 1035 s2.3.4; an empty label (".x", "a..b") is no name at all, and a
        # resolver refuses both (Python's idna codec with a UnicodeError)
        if not label:
            raise ValueError(f"{host!r} has an empty label")
        if len(label) > _MAX_LABEL:
            raise ValueError(f"{host!r} has a label longer than {_MAX_LABEL} characters")
    return h


# IPv6 ranges that ``ipaddress`` (Python 3.11) still calls global but that can lead to
# an internal host, so mcc never connects to them by a wildcard-allowed name.
_ALSO_INTERNAL = (
    # 6to4 (RFC 3056): a relay unwraps the embedded IPv4 address, which may be private
    ipaddress.IPv6Network("2002::/16"),
    # site-local (RFC 3879 deprecated it, but networks still route it internally)
    ipaddress.IPv6Network("fec0::/10"),
)
# NAT64 well-known prefix (RFC 6052 s2.1): the last 32 bits are the IPv4 address the
# translator connects to, so the address is judged by that IPv4 address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_internal_address(address: str) -> bool:
    """True for every address that is not globally reachable: loopback, private,
    shared (100.64.0.0/10), link-local (cloud metadata lives at 169.254.169.254),
    unique- and site-local, 6to4, documentation, unspecified, multicast and reserved.

    IPv4 addresses wrapped in IPv6 (``::ffff:10.0.0.1``, NAT64 ``64:ff9b::a00:1``) are
    judged by the IPv4 address. Anything that does not parse counts as internal.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True  # not an address we can judge: treat as internal
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif any(ip in net for net in _ALSO_INTERNAL):
            return True
    # is_global leaves multicast (224.0.0.0/4, ff00::/8) and some reserved ranges in
    return not ip.is_global or ip.is_multicast or ip.is_reserved


@attrs.frozen
class _Pattern:
    host: str  # normalised; for a wildcard, the suffix without "*."
    port: int | None
    wildcard: bool
    https: bool = False  # written "https://...": fetch over TLS

    @classmethod
    def parse(cls, text: str) -> _Pattern:
        scheme, sep, rest = text.partition("://")
        if sep and scheme.lower() not in ("http", "https"):
            raise ValueError(f"{text!r}: only http:// or https:// may prefix a host pattern")
        body = rest.rstrip("/") if sep else text
        wildcard = body.startswith("*.")
        body = body[2:] if wildcard else body
        host, port = split_host_port(body, default_port=0)
        return cls(host, port or None, wildcard, https=bool(sep) and scheme.lower() == "https")

    def matches(self, host: str, port: int) -> bool:
        if self.port is None:
            if port not in _DEFAULT_PORTS:
                return False
        elif port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


@attrs.frozen
class OriginPolicy:
    """The allowlist plus the canonical-alias table, compiled for matching.

    Args:
      patterns: allowlist entries (``host``, ``host:port``, ``*.suffix``).
      canonical_hosts: mirror host -> canonical host; a mirror named here is allowed
        and its objects are filed under the canonical name, so that several mirrors
        share one cache entry.
    """

    _patterns: tuple[_Pattern, ...]
    _canonical: Mapping[str, str]

    @classmethod
    def build(
        cls, patterns: Iterable[str], canonical_hosts: Mapping[str, str] | None = None
    ) -> OriginPolicy:
        """Compile patterns; raises ValueError naming the first bad one."""
        canonical = {
            normalize_host(k): normalize_host(v) for k, v in (canonical_hosts or {}).items()
        }
        compiled = [_Pattern.parse(p) for p in patterns]
        compiled += [_Pattern(h, None, False) for h in canonical]
        return cls(tuple(compiled), canonical)

    def allows(self, host: str, port: int) -> bool:
        """True when ``host:port`` (already normalised) may be fetched."""
        return any(p.matches(host, port) for p in self._patterns)

    def allows_explicitly(self, host: str, port: int) -> bool:
        """True when a pattern names ``host`` itself (no wildcard): only then may it
        resolve to an internal address (``127.0.0.1:8000``, ``mirror.lan``)."""
        return any(not p.wildcard and p.matches(host, port) for p in self._patterns)

    def upstream_scheme(self, host: str, port: int) -> str:
        """``"https"`` when a pattern written ``https://`` matches ``host:port``, else
        ``"http"``: the scheme for requests that name only a host."""
        return "https" if any(p.https and p.matches(host, port) for p in self._patterns) else "http"

    def canonical(self, host: str) -> str:
        """The name objects from ``host`` are filed under."""
        return self._canonical.get(host, host)
