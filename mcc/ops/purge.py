"""What a purge removes: objects whose URL starts with a prefix, or whose host matches
a pattern in the allowlist's syntax.

A target is either an ``http://`` URL, taken as a prefix of the stored URLs
(``http://deb.debian.org/debian/pool/`` removes everything below it; a whole URL
removes that object and any whose URL it begins), or a host pattern: ``host``,
``host:port`` or ``*.suffix``; ``*`` alone is every object. Unlike the allowlist, a
pattern without a port matches the host on every port: a purge is meant to remove,
not to let in.

Hosts are normalised as the allowlist normalises them, and mapped to their canonical
name (``canonical_hosts``), because that is the name objects are filed under.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ..origins import normalize_host, split_host_port
from ..upstream.client import DEFAULT_PORTS, parse_http_url, parse_url

__all__ = ["PurgeTarget"]


@attrs.frozen
class PurgeTarget:
    """A parsed purge target; see the module docstring. Make one with :meth:`parse`."""

    text: str
    prefix: str | None = None  # a URL prefix, as stored keys are written
    host: str | None = None  # for a wildcard: the suffix without "*."
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str, canonical: Callable[[str], str] = str) -> PurgeTarget:
        """Parse a URL prefix or a host pattern.

        Args:
          text: what the user gave.
          canonical: host -> the name its objects are filed under.

        Raises:
          ValueError: one line naming the text and the accepted forms.
        """
        if text == "*":
            return cls(text, prefix="")  # every object
        if "://" in text:
            try:
                scheme, host, port, target = parse_url(text)
            except ValueError:
                raise ValueError(f"{text!r} is not an http:// or https:// URL") from None
            host = canonical(host)
            authority = f"[{host}]" if ":" in host else host
            if port != DEFAULT_PORTS[scheme]:
                authority += f":{port}"
            return cls(text, prefix=f"{scheme}://{authority}{target}")
        wildcard = text.startswith("*.")
        body = text[2:] if wildcard else text
        try:
            host, port = split_host_port(body, default_port=0)
            if wildcard:
                host = normalize_host(host)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither an http:// URL nor a host pattern "
                "(host, host:port or *.suffix)"
            ) from None
        if not wildcard:
            host = canonical(host)
        return cls(text, host=host, port=port or None, wildcard=wildcard)

    def matches(self, key: str) -> bool:
        """True when the stored object ``key`` (a normalised URL) is to be purged."""
        if self.prefix is not None:
            return key.startswith(self.prefix)
        try:
            host, port, _ = parse_http_url(key)
        except ValueError:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + str(self.host))
        return host == self.host
