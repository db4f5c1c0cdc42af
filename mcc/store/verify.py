"""Walk a whole cache and check every blob against its name and the index (``mcc verify``).

Finds corrupt blobs (content no longer matches the digest that names it), missing
blobs (named by the index, absent on disk), orphan blobs (on disk, named by no index
row) and temp files left by a crash. With ``repair``: corrupt blobs are quarantined
and their rows dropped (the next read refetches them), rows of missing blobs are
dropped, orphans and temp files are deleted.

A cache in use by a server is locked (see :mod:`mcc.store.lock`): ``mcc verify``
takes the lock too, so it refuses to walk a cache that a server is changing, and a
server cannot start on a cache being repaired. A running node checks its own cache
through its admin API (``lock=False``, never with ``repair``: blobs in flight may
show up as orphans there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import attrs

from .blobs import BlobStore, DriveInfo
from .index import Index
from .lock import lock_drives

__all__ = ["VerifyReport", "verify_cache"]


@attrs.define
class VerifyReport:
    """What a verification found (and, with repair, fixed)."""

    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[str] = attrs.field(factory=list)
    missing: list[str] = attrs.field(factory=list)
    orphans: list[str] = attrs.field(factory=list)
    temp_files: int = 0
    repaired: bool = False
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """True when nothing was wrong."""
        return not (self.corrupt or self.missing or self.orphans or self.temp_files)

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (what, how many) pairs, for a table."""
        action = "repaired" if self.repaired else "found"
        return [
            ("blobs checked", str(self.checked)),
            ("bytes checked", str(self.bytes_checked)),
            (f"corrupt ({action})", str(len(self.corrupt))),
            (f"missing ({action})", str(len(self.missing))),
            (f"orphans ({action})", str(len(self.orphans))),
            (f"temp files ({action})", str(self.temp_files)),
            ("seconds", f"{self.seconds:.1f}"),
        ]


def verify_cache(
    drives: list[DriveInfo],
    index_path: Path,
    *,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
    lock: bool = True,
) -> VerifyReport:
    """Check every blob of a cache; see the module docstring.

    Args:
      drives: the cache drives.
      index_path: the sqlite index file.
      repair: fix what is found.
      progress: called with (bytes done, bytes in all) as blobs are checked.
      lock: take the cache directories' locks for the walk (off only for the
        running server's own check).

    Raises:
      CacheLocked: a server (or another verify) holds a cache directory.
    """
    if repair and not lock:
        raise ValueError("repair needs the cache to itself (lock=True)")
    if not lock:
        return _walk(drives, index_path, repair, progress)
    with lock_drives(d.root for d in drives):
        return _walk(drives, index_path, repair, progress)


def _walk(
    drives: list[DriveInfo],
    index_path: Path,
    repair: bool,
    progress: Callable[[int, int], None] | None,
) -> VerifyReport:
    started = time.monotonic()
    blobs = BlobStore(drives)
    index = Index(index_path)
    report = VerifyReport(repaired=repair)
    try:
        indexed = index.all_digests()
        on_disk = {d for d, *_ in blobs.iter_blob_files()}
        total = sum(indexed.values())
        done = 0
        for digest, size in sorted(indexed.items()):
            if digest not in on_disk:
                report.missing.append(digest)
            elif not blobs.verify(digest):
                report.corrupt.append(digest)
            else:
                report.checked += 1
                report.bytes_checked += size
            done += size
            if progress is not None:
                progress(done, total)
        report.orphans = sorted(on_disk - set(indexed))
        report.temp_files = sum(1 for d in drives for _ in (d.root / "tmp").iterdir())
        if repair:
            for digest in report.missing:
                index.drop_digest(digest)
            for digest in report.corrupt:
                blobs.quarantine(digest)
                index.drop_digest(digest)
            for digest in report.orphans:
                if not index.is_referenced(digest):
                    blobs.delete(digest)
            blobs.sweep_tmp()
    finally:
        index.close()
    report.seconds = time.monotonic() - started
    return report
