"""Access times (for least-recently-used eviction) written off the event loop.

Theory of operation: a hit only notes the time its blobs were read, in memory
(:meth:`~mcc.store.index.Index.touch`); every few seconds the store takes what was
noted and :func:`write_access_times` writes it from a worker thread. The index's
main connection belongs to the event loop's thread, so this opens a connection of
its own, as the WAL checkpoint does. sqlite has one writer at a time: the rows go in
transactions of :data:`TOUCH_BATCH`, so a write of the loop's waits for one short
transaction at most. Written in one transaction on the loop, a few thousand rows
held it for tens of ms.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["TOUCH_BATCH", "TOUCH_SQL", "write_access_times"]

# Rows per transaction (128 take well under a millisecond): how long a write of the
# event loop's may wait for this writer (its transactions are IMMEDIATE: schema.Tx).
TOUCH_BATCH = 128
# An access time never goes back: a flush from the loop (before an eviction) may have
# written a newer one meanwhile.
TOUCH_SQL = "UPDATE blobs SET last_access=MAX(last_access, ?) WHERE digest=?"


def write_access_times(path: Path, pending: dict[str, float]) -> None:
    """Write ``pending`` (digest -> time) to the index at ``path``. Blocking: call it
    from a worker thread.

    Raises:
      sqlite3.OperationalError: the index could not be written (a full disk).
    """
    if not pending:
        return
    rows = [(t, d) for d, t in pending.items()]
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA synchronous=NORMAL")  # as the main connection's commits
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints are Index.checkpoint's
        for i in range(0, len(rows), TOUCH_BATCH):
            db.execute("BEGIN IMMEDIATE")  # the write lock now, waiting while taken
            try:
                db.executemany(TOUCH_SQL, rows[i : i + TOUCH_BATCH])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    finally:
        db.close()
