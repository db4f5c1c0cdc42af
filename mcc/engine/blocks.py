"""Objects, versions and the arithmetic that maps byte ranges onto fixed-size blocks.

Block ``i`` of an object of ``size`` bytes covers ``[i*B, min((i+1)*B, size))``.
All functions here are pure; ranges are inclusive at both ends, as in HTTP.
"""

from __future__ import annotations

from ..store.records import ObjectMeta, make_version

__all__ = ["ObjectMeta", "block_bounds", "block_count", "blocks_for_range", "make_version"]


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
