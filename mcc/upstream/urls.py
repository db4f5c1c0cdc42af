"""Upstream URLs: splitting ``http(s)://host[:port]/target`` and making a target
safe to send."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from ..origins import split_host_port

__all__ = ["DEFAULT_PORTS", "parse_http_url", "parse_url", "quote_target"]


DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_url(url: str) -> tuple[str, str, int, str]:
    """Split ``http[s]://host[:port]/path?q`` into (scheme, host, port, path-and-query).

    Raises:
      ValueError: naming the URL when it is not an http:// or https:// URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    host, port = split_host_port(parts.netloc, DEFAULT_PORTS[parts.scheme])
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.scheme, host, port, target


def parse_http_url(url: str) -> tuple[str, int, str]:
    """Split ``http[s]://host[:port]/path?q`` into (host, port, path-and-query).

    Raises:
      ValueError: naming the URL when it is not an http:// or https:// URL.
    """
    _, host, port, target = parse_url(url)
    return host, port, target


def quote_target(url: str) -> str:
    """``url`` with every byte a request-target may not carry percent-encoded (spaces,
    controls, non-ASCII as UTF-8), as browsers do with a Location they follow; what is
    already encoded stays as it is."""
    return quote(url, safe="/?#[]@!$&'()*+,;=%:~")
