"""Walk a whole cache and check every blob against its name and the index (``mcc verify``).

Finds corrupt blobs (content no longer matches the digest that names it), missing
blobs (named by the index, absent on disk), orphan blobs (on disk, named by no index
row) and temp files left by a crash. With ``repair``: corrupt blobs are quarantined
and their rows dropped (the next read refetches them), rows of missing blobs are
dropped, orphans and temp files are deleted.

Safe to run next to a running server; run it with the server stopped for a snapshot
that does not move while it is walked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import attrs

from .blobs import BlobStore, DriveInfo
from .index import Index

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

    def table(self) -> str:
        """A plain-text summary table."""
        action = "repaired" if self.repaired else "found"
        rows = [
            ("blobs checked", str(self.checked)),
            ("bytes checked", str(self.bytes_checked)),
            (f"corrupt ({action})", str(len(self.corrupt))),
            (f"missing ({action})", str(len(self.missing))),
            (f"orphans ({action})", str(len(self.orphans))),
            (f"temp files ({action})", str(self.temp_files)),
            ("seconds", f"{self.seconds:.1f}"),
        ]
        width = max(len(r[0]) for r in rows)
        line = "+" + "-" * (width + 2) + "+" + "-" * 16 + "+"
        out = [line] + [f"| {k:<{width}} | {v:>14} |" for k, v in rows] + [line]
        return "\n".join(out)


def verify_cache(
    drives: list[DriveInfo],
    index_path: Path,
    *,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check every blob of a cache; see the module docstring.

    Args:
      drives: the cache drives.
      index_path: the sqlite index file.
      repair: fix what is found.
      progress: called with (done, total) as blobs are checked.
    """
    started = time.monotonic()
    blobs = BlobStore(drives)
    index = Index(index_path)
    report = VerifyReport(repaired=repair)
    try:
        indexed = index.all_digests()
        on_disk = {d for d, _ in blobs.iter_blob_files()}
        total = len(indexed)
        for n, (digest, size) in enumerate(sorted(indexed.items()), start=1):
            if digest not in on_disk:
                report.missing.append(digest)
            elif not blobs.verify(digest):
                report.corrupt.append(digest)
            else:
                report.checked += 1
                report.bytes_checked += size
            if progress is not None:
                progress(n, total)
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
