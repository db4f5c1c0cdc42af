"""Start-up recovery: what a crash or a power loss may have left, judged.

Theory of operation: a commit makes a block durable in this order (see
:mod:`mcc.store.commits`): temp file written and fsynced, renamed to its blob name,
folder fsynced, index row inserted, WAL fsynced. A crash between any two steps
leaves one of these, which the next start repairs and counts:

=====================  ===========================================  ==============
found                  left by                                      repair
=====================  ===========================================  ==============
a temp file            a crash before the rename                    removed
a blob no row names    a crash before its row was durable           removed
a row, blob missing    eviction mid-way, or a power loss on a cache  row dropped
                       run with ``durable = false``
a row, blob short      a power loss with ``durable = false`` (the    row dropped,
                       rename reached the disk, the bytes did not)   file removed
=====================  ===========================================  ==============

With ``durable = true`` the last two never come from a power loss: a row is written
only after its blob's bytes and name are on disk. A blob file whose length matches
its row is trusted here (hashing a whole cache would delay every start); its digest
is checked on its first read (``verify_on_read``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Damage", "RecoveryCounts", "judge", "reconcile"]

log = logging.getLogger("mcc.store")

# Seconds before the start that a blob file must be older than to count as an orphan:
# file times are coarser than time.time() (a kernel tick).
_RECONCILE_MARGIN = 2.0


@attrs.define
class RecoveryCounts:
    """What the start-up recovery found and repaired (each a count)."""

    temp_files: int = 0  # temp files removed
    orphan_blobs: int = 0  # blob files no index row names, removed
    missing_blobs: int = 0  # index rows whose blob file is gone, dropped
    short_blobs: int = 0  # index rows whose blob file has the wrong length, dropped

    def describe(self) -> str:
        """One log line's worth."""
        return (
            f"{self.temp_files} temp files removed, {self.orphan_blobs} orphan blobs removed, "
            f"{self.missing_blobs} rows without blob dropped, {self.short_blobs} rows with "
            "a short blob dropped"
        )


@attrs.frozen
class Damage:
    """What :func:`judge` found: blob digests in each state."""

    missing: tuple[str, ...] = ()
    short: tuple[str, ...] = ()
    orphans: tuple[str, ...] = ()


def judge(
    indexed: Mapping[str, int], files: Mapping[str, tuple[float, int]], before: float
) -> Damage:
    """Compare the index with the blob files (a pure function).

    Args:
      indexed: digest -> size, every blob the index names.
      files: digest -> (modification time, length), every blob file found.
      before: files modified at or after this time are being written now, never
        orphans.

    Returns:
      The rows whose file is missing or of another length, and the orphan files.
    """
    missing = tuple(d for d in indexed if d not in files)
    short = tuple(d for d, size in indexed.items() if d in files and files[d][1] != size)
    orphans = tuple(d for d, (mtime, _) in files.items() if d not in indexed and mtime < before)
    return Damage(missing, short, orphans)


async def reconcile(store: Store, counts: RecoveryCounts | None) -> tuple[int, int]:
    """Make ``store``'s index and blob files agree: drop index rows whose blob is
    missing or short, delete blob files no row names (older than the store's start,
    so a blob being written now is never taken for an orphan) and short ones.

    Args:
      store: the store.
      counts: where the start-up run records its counts (and logs one line).

    Returns:
      (rows dropped, orphan files deleted).
    """
    index, blobs = store.index, store.blobs
    indexed = index.all_digests()  # before the walk: later rows are not judged
    walk = await trio.to_thread.run_sync(lambda: list(blobs.iter_blob_files()))
    files = {d: (mtime, size) for d, mtime, size in walk}
    damage = judge(indexed, files, store.started - _RECONCILE_MARGIN)
    # look again: a blob may have been stored again (or evicted) since the walk
    missing = [d for d in damage.missing if not blobs.exists(d)]
    short = [d for d in damage.short if blobs.size_of(d) not in (None, indexed[d])]
    for digest in (*missing, *short):
        index.drop_digest(digest)
    orphans = [d for d in damage.orphans if not index.is_referenced(d)]
    await store.delete_blobs([*orphans, *short])
    if counts is not None:
        counts.orphan_blobs, counts.missing_blobs = len(orphans), len(missing)
        counts.short_blobs = len(short)
        log.info("start-up recovery: %s", counts.describe())
    elif missing or short or orphans:
        log.info(
            "reconciled the cache: %d index rows without blob dropped, %d with a short "
            "blob, %d orphan blobs deleted",
            len(missing),
            len(short),
            len(orphans),
        )
    return len(missing) + len(short), len(orphans)
