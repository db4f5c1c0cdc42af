"""What the store keeps about one object: its record.

A record names one *version* of one object (the cache key is the canonical URL) and
everything needed to serve and refetch it after a restart: its size, validators, the
response header fields replayed to clients, when upstream last confirmed it, the URL it
was actually fetched from (after redirects), and the block size its blocks were cut at.
"""

from __future__ import annotations

import attrs

__all__ = ["ObjectMeta", "make_version"]


@attrs.frozen
class ObjectMeta:
    """What the cache knows about one version of one object.

    Attributes:
      key: the canonical origin URL (after canonical-host mapping); the cache key.
      version: names this representation: ``e:<etag>`` (strong ETag), else
        ``m:<last-modified>:<size>``, else ``s:<size>``.
      size: length in bytes.
      etag / last_modified / content_type: as upstream sent them.
      headers: upstream headers replayed to clients (Cache-Control, Expires, ...).
      fetched_at: when upstream last confirmed this version (Unix time).
      fetch_url: where its bytes come from (the URL after redirects); None: ``key``.
      block_size: the size its blocks are cut at (0: not yet given; the store fills in
        the cache directory's size when it files the record).
    """

    key: str
    version: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    fetched_at: float = 0.0
    fetch_url: str | None = None
    block_size: int = 0

    @property
    def strong_etag(self) -> str | None:
        """The ETag when it is strong (usable in If-Range), else None."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return None

    @property
    def source(self) -> str:
        """The URL to fetch this object's bytes from."""
        return self.fetch_url or self.key


def make_version(etag: str | None, last_modified: str | None, size: int) -> str:
    """The version name of a representation; see :class:`ObjectMeta`."""
    if etag and not etag.startswith("W/"):
        return f"e:{etag}"
    if last_modified:
        return f"m:{last_modified}:{size}"
    return f"s:{size}"
