"""Objects, versions and the arithmetic that maps byte ranges onto fixed-size blocks.

Block ``i`` of an object of ``size`` bytes covers ``[i*B, min((i+1)*B, size))``.
All functions here are pure; ranges are inclusive at both ends, as in HTTP.
"""

from __future__ import annotations

import attrs

__all__ = ["ObjectMeta", "block_bounds", "block_count", "blocks_for_range", "make_version"]


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
    """

    key: str
    version: str
    size: int
    etag: str | None = None
    last_modified: str | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    fetched_at: float = 0.0

    @property
    def strong_etag(self) -> str | None:
        """The ETag when it is strong (usable in If-Range), else None."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return None


def make_version(etag: str | None, last_modified: str | None, size: int) -> str:
    """The version name of a representation; see :class:`ObjectMeta`."""
    if etag and not etag.startswith("W/"):
        return f"e:{etag}"
    if last_modified:
        return f"m:{last_modified}:{size}"
    return f"s:{size}"


def block_count(size: int, block_size: int) -> int:
    """How many blocks an object of ``size`` bytes has (0 for an empty object)."""
    return -(-size // block_size)


def block_bounds(index: int, block_size: int, size: int) -> tuple[int, int]:
    """Block ``index``'s byte span as ``(start, end_exclusive)``."""
    start = index * block_size
    return start, min(start + block_size, size)


def blocks_for_range(start: int, end: int, block_size: int) -> range:
    """The indexes of the blocks that the inclusive range ``start..end`` touches."""
    if end < start:
        return range(0)
    return range(start // block_size, end // block_size + 1)
