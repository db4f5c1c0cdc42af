"""Checking stored blobs while the node serves: one at a time (the background scrub,
:mod:`mcc.engine.scrub`), or every one with repair (a live ``mcc verify --repair``).

A blob found corrupt here is quarantined by the running node itself
(:meth:`~mcc.store.store.Store.quarantine`): its cached fd is forgotten and its rows
dropped, so it stops being served at once and its block is fetched again. Orphans
and temp files are left alone: blobs being written show up as such.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import trio

from .store import Store
from .verify import VerifyReport, verify_cache

__all__ = ["blob_page", "check_blob", "health", "verify_live"]

log = logging.getLogger("mcc.store")


def blob_page(store: Store, after: str, limit: int) -> list[tuple[str, int]]:
    """Up to ``limit`` stored blobs (digest, size) whose digest sorts after ``after``,
    in digest order: a walk over every blob in pages, each a short query (all at once
    took a second on the event loop with a million blobs)."""
    return store.index.digests_after(after, limit)


async def check_blob(store: Store, digest: str) -> bool | None:
    """Re-hash one stored blob now (in a worker thread); a corrupt one is quarantined.

    Returns:
      True when it matches its digest, False when it did not (quarantined), None when
      it is not there (evicted meanwhile).
    """
    if not store.blobs.exists(digest):
        return None
    if await trio.to_thread.run_sync(store.blobs.verify, digest):
        return True
    if not store.blobs.exists(digest):
        return None
    store.condemn(digest, "does not match its digest")
    return False


async def verify_live(store: Store, *, repair: bool = False) -> VerifyReport:
    """Check every blob while serving; with ``repair``, each corrupt blob (checked once
    more) is quarantined and the rows of missing ones dropped.

    Returns:
      The report (``repaired`` set with ``repair``).
    """
    report = await trio.to_thread.run_sync(
        functools.partial(verify_cache, list(store.blobs.drives), store.index.path, lock=False)
    )
    if repair:
        report.repaired = True
        for digest in report.corrupt:
            await check_blob(store, digest)
        for digest in report.missing:
            if not store.blobs.exists(digest):
                store.quarantine(digest)  # (no file to move: its rows are dropped)
    return report


def health(store: Store) -> tuple[list[tuple[Path, bool]], bool]:
    """Whether each drive takes a write (a probe file in its temp folder), and
    whether the index answers."""
    drives = []
    for d in store.blobs.drives:
        ok = True
        probe = d.root / "tmp" / f".health.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            ok = False
        drives.append((d.root, ok))
    try:
        store.index.stored_bytes()
        store.index.setting("block_size")
        index_ok = True
    except Exception:
        index_ok = False
    return drives, index_ok
