"""The sqlite index: (url, version, block index) -> blob digest, plus object metadata.

Theory of operation: sqlite in WAL mode with ``synchronous=NORMAL``: a commit is a
sequential append to the WAL with no fsync, so a process crash (``kill -9``) loses
nothing committed and a power loss loses at most the last commits, never the
database's consistency (the schema itself is created durably: :mod:`.schema`).
Block rows are made durable in batches by :meth:`Index.sync` (the store's group
commit, :mod:`.commits`). The ordering rules that keep index and blob files in step:

- a block row is inserted only after its blob file is durable under its name, so a
  crash leaves an orphan blob (reclaimed later), never a row without a blob;
- a blob file is deleted only after its last row is gone, with the same result.

Each call is one short transaction, so the engine calls it directly on the trio
thread: measured here, ``add_block`` takes 43 us (median) and ``get_blocks`` 6 us.
What does not fit on the event loop is sqlite's automatic checkpoint, which copies
the WAL into the database and fsyncs it inside some unlucky commit (46 ms seen).
Automatic checkpoints are therefore off; :meth:`Index.checkpoint` runs them from a
worker thread on a connection of its own (a PASSIVE checkpoint never blocks writers).
Access times are written the same way (:mod:`.touches`): the main connection is
used by the event loop's thread only.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .records import ObjectMeta
from .schema import SCHEMA_VERSION, Tx, open_database
from .touches import TOUCH_SQL, write_access_times

__all__ = ["SCHEMA_VERSION", "Index"]

# Objects whose block maps are kept in memory (least recently used dropped first).
_MAP_CACHE_OBJECTS = 4096


_F = TypeVar("_F", bound=Callable[..., Any])


def _writes(fn: _F) -> _F:
    """Report a failed index write (disk full, I/O error) as OSError, like a failed
    blob write, so callers handle both the same way: serve, do not store."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            code = errno.ENOSPC if "full" in str(exc) else errno.EIO
            raise OSError(code, f"index write failed: {exc}") from exc

    return wrapper  # type: ignore[return-value]


class Index:
    """The index database of one cache.

    Args:
      path: the sqlite file (created with the schema when missing).

    Raises:
      sqlite3.DatabaseError: the file is not an mcc index, or is from a newer mcc.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._usage: dict[int, int] = {}  # drive -> bytes, kept in step with blobs
        # Read-through cache of block maps, (key, version) -> {idx: digest}, kept in
        # step by every write below: a hit then costs no query at all.
        self._maps: OrderedDict[tuple[str, str], dict[int, str]] = OrderedDict()
        # Access times waiting for flush_touches() (one transaction per interval
        # instead of one per read).
        self._touched: dict[str, float] = {}
        self._db, self.migrated_from = open_database(path)
        self._load_usage()

    def setting(self, name: str) -> str | None:
        """A setting of this cache directory (kept with its data), or None."""
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @_writes
    def set_setting(self, name: str, value: str) -> None:
        """Record a setting of this cache directory."""
        with self._tx():
            self._db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                (name, value),
            )

    def file_bytes(self) -> int:
        """The bytes the index's rows take: its database's pages in use (free pages
        are reused, so this is what grows). Its WAL is not counted: it is cut back to
        ``WAL_LIMIT`` after each checkpoint, every few seconds."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        row = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
        return int(row[0])

    def _tx(self) -> Tx:
        return Tx(self._db, self._after_rollback)

    def _after_rollback(self) -> None:
        # the in-memory mirrors may have moved with the statements rolled back
        self._load_usage()
        self._maps.clear()

    def close(self) -> None:
        """Close the database (after the last access times and a checkpoint)."""
        try:
            self.flush_touches()
        except OSError:
            pass  # a full disk: only the LRU order is lost
        try:
            self.checkpoint()
        except sqlite3.OperationalError:
            pass  # a full disk: the WAL stays, and is replayed at the next open
        self._db.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file. Blocking: call it from a worker thread.

        Uses a connection of its own, so it may run while the main connection works.
        """
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    # -- objects ---------------------------------------------------------------

    def get_object(self, key: str) -> ObjectMeta | None:
        """The stored metadata for ``key``, or None."""
        row = self._db.execute(
            "SELECT key, version, size, etag, last_modified, content_type, headers, fetched_at, "
            "fetch_url, block_size FROM objects WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        headers = tuple((str(k), str(v)) for k, v in json.loads(row[6]))
        return ObjectMeta(
            row[0], row[1], row[2], row[3], row[4], row[5], headers, row[7], row[8], row[9]
        )

    @_writes
    def put_object(self, meta: ObjectMeta) -> list[str]:
        """Store ``meta``; a different version of the same key is dropped with its blocks.

        Returns:
          Digests no longer referenced by any block (the caller deletes their files).
        """
        with self._tx():
            old = self._db.execute(
                "SELECT version FROM objects WHERE key=?", (meta.key,)
            ).fetchone()
            freed: list[str] = []
            if old is not None and old[0] != meta.version:
                freed = self._drop_blocks(meta.key)
            self._db.execute(
                "INSERT OR REPLACE INTO objects (key, version, size, etag, last_modified, "
                "content_type, headers, fetched_at, fetch_url, block_size) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    meta.key,
                    meta.version,
                    meta.size,
                    meta.etag,
                    meta.last_modified,
                    meta.content_type,
                    json.dumps(meta.headers),
                    meta.fetched_at,
                    meta.fetch_url,
                    meta.block_size,
                ),
            )
            return freed

    @_writes
    def delete_object(self, key: str) -> list[str]:
        """Forget ``key`` and its blocks; returns digests no longer referenced."""
        with self._tx():
            freed = self._drop_blocks(key)
            self._db.execute("DELETE FROM objects WHERE key=?", (key,))
            return freed

    def object_keys(self) -> list[str]:
        """Every object key."""
        return [r[0] for r in self._db.execute("SELECT key FROM objects ORDER BY key")]

    def _drop_blocks(self, key: str) -> list[str]:
        self._forget_maps(key)
        digests = [
            r[0] for r in self._db.execute("SELECT DISTINCT digest FROM blocks WHERE key=?", (key,))
        ]
        self._db.execute("DELETE FROM blocks WHERE key=?", (key,))
        return self._unreferenced(digests)

    def _unreferenced(self, digests: Iterable[str]) -> list[str]:
        freed = []
        for d in digests:
            if self._db.execute("SELECT 1 FROM blocks WHERE digest=? LIMIT 1", (d,)).fetchone():
                continue
            self._delete_blob_row(d)
            freed.append(d)
        return freed

    def _delete_blob_row(self, digest: str) -> None:
        row = self._db.execute("SELECT size, drive FROM blobs WHERE digest=?", (digest,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM blobs WHERE digest=?", (digest,))
            self._usage[row[1]] = self._usage.get(row[1], 0) - row[0]

    def _load_usage(self) -> None:
        self._usage = {
            int(r[0]): int(r[1])
            for r in self._db.execute("SELECT drive, SUM(size) FROM blobs GROUP BY drive")
        }

    # -- blocks ----------------------------------------------------------------

    @_writes
    def add_block(
        self, key: str, version: str, idx: int, digest: str, size: int, drive: int = 0
    ) -> list[str] | None:
        """Record that block ``idx`` of ``key``/``version`` is blob ``digest``.

        Returns:
          None (and records nothing) when that object version is no longer current,
          e.g. it changed upstream while the block was in flight; else the digests no
          longer referenced (a block re-stored with other bytes frees its old blob).
        """
        return self.add_blocks([(key, version, idx, digest, size, drive)])[0]

    @_writes
    def add_blocks(
        self, rows: Sequence[tuple[str, str, int, str, int, int]]
    ) -> list[list[str] | None]:
        """Record many blocks, each ``(key, version, idx, digest, size, drive)`` as in
        :meth:`add_block`, in one transaction (a group commit); one result per row."""
        with self._tx():
            return [self._add_block_row(*row) for row in rows]

    def _add_block_row(
        self, key: str, version: str, idx: int, digest: str, size: int, drive: int
    ) -> list[str] | None:
        row = self._db.execute("SELECT version FROM objects WHERE key=?", (key,)).fetchone()
        if row is None or row[0] != version:
            return None
        old = self._db.execute(
            "SELECT digest FROM blocks WHERE key=? AND version=? AND idx=?", (key, version, idx)
        ).fetchone()
        self._db.execute(
            "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?)", (key, version, idx, digest)
        )
        known = self._db.execute("SELECT 1 FROM blobs WHERE digest=?", (digest,)).fetchone()
        self._db.execute(
            "INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT(digest) DO UPDATE "
            "SET last_access=excluded.last_access",
            (digest, size, time.time(), drive),
        )
        if known is None:
            self._usage[drive] = self._usage.get(drive, 0) + size
        blocks = self._maps.get((key, version))
        if blocks is not None:
            blocks[idx] = digest
        if old is not None and old[0] != digest:
            return self._unreferenced([old[0]])
        return []

    def sync(self) -> None:
        """Make every commit so far durable: fsync the WAL, as ``synchronous=FULL``
        does at each commit (blocking: call it from a worker thread). Commits run
        with ``NORMAL``, so this is how a batch of block rows becomes durable at one
        fsync. A WAL just reset by a checkpoint holds nothing to sync: the checkpoint
        fsynced the database with those rows already."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get_blocks(self, key: str, version: str, first: int, last: int) -> dict[int, str]:
        """Digests of the stored blocks ``first..last`` (inclusive) of ``key``/``version``."""
        blocks = self._map(key, version)
        if last - first < len(blocks):
            return {i: blocks[i] for i in range(first, last + 1) if i in blocks}
        return {i: d for i, d in blocks.items() if first <= i <= last}

    def _map(self, key: str, version: str) -> dict[int, str]:
        mk = (key, version)
        blocks = self._maps.get(mk)
        if blocks is None:
            blocks = dict(
                self._db.execute(
                    "SELECT idx, digest FROM blocks WHERE key=? AND version=?", (key, version)
                ).fetchall()
            )
            self._maps[mk] = blocks
            if len(self._maps) > _MAP_CACHE_OBJECTS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(mk)
        return blocks

    def _forget_maps(self, key: str) -> None:
        for mk in [mk for mk in self._maps if mk[0] == key]:
            del self._maps[mk]

    @_writes
    def drop_digest(
        self, digest: str, *, empty_objects: bool = False
    ) -> list[tuple[str, str, int]]:
        """Forget every block naming ``digest`` (a corrupt, missing or evicted blob);
        with ``empty_objects``, also the records of objects left with no block (eviction:
        an index row costs disk too, and a record is cheap to learn again).

        Returns:
          The (key, version, idx) rows that were dropped.
        """
        with self._tx():
            rows = self._db.execute(
                "SELECT key, version, idx FROM blocks WHERE digest=?", (digest,)
            ).fetchall()
            self._db.execute("DELETE FROM blocks WHERE digest=?", (digest,))
            self._delete_blob_row(digest)
            for key, version, idx in rows:
                blocks = self._maps.get((key, version))
                if blocks is not None:
                    blocks.pop(idx, None)
            if empty_objects:
                for key in {r[0] for r in rows}:
                    if not self._db.execute(
                        "SELECT 1 FROM blocks WHERE key=? LIMIT 1", (key,)
                    ).fetchone():
                        self._db.execute("DELETE FROM objects WHERE key=?", (key,))
                        self._forget_maps(key)
            return [(r[0], r[1], r[2]) for r in rows]

    @_writes
    def drop_empty_objects(self, limit: int) -> int:
        """Forget up to ``limit`` records of objects with no stored block, least recently
        confirmed first (objects whose every fetch failed, or was never stored); returns
        how many."""
        with self._tx():
            keys = [
                r[0]
                for r in self._db.execute(
                    "SELECT key FROM objects WHERE NOT EXISTS "
                    "(SELECT 1 FROM blocks WHERE blocks.key = objects.key) "
                    "ORDER BY fetched_at LIMIT ?",
                    (limit,),
                )
            ]
            self._db.executemany("DELETE FROM objects WHERE key=?", [(k,) for k in keys])
            for key in keys:
                self._forget_maps(key)
            return len(keys)

    def is_referenced(self, digest: str) -> bool:
        """True when some block names ``digest``."""
        row = self._db.execute("SELECT 1 FROM blocks WHERE digest=? LIMIT 1", (digest,)).fetchone()
        return row is not None

    def touch(self, digests: Iterable[str], when: float | None = None) -> None:
        """Record a read of these blobs (for least-recently-used eviction); written to
        the database by :meth:`flush_touches`."""
        now = time.time() if when is None else when
        for d in digests:
            self._touched[d] = now

    @_writes
    def flush_touches(self) -> None:
        """Write the access times recorded since the last flush (one transaction)."""
        if not self._touched:
            return
        pending = self.take_touches()
        with self._tx():
            self._db.executemany(TOUCH_SQL, [(t, d) for d, t in pending.items()])

    def take_touches(self) -> dict[str, float]:
        """The access times recorded since the last flush, digest -> time, for
        :meth:`write_touches`; they are no longer pending here."""
        pending, self._touched = self._touched, {}
        return pending

    @_writes
    def write_touches(self, pending: dict[str, float]) -> None:
        """Write access times taken with :meth:`take_touches`, on a connection of its
        own (:mod:`.touches`). Blocking: call it from a worker thread."""
        write_access_times(self.path, pending)

    def lru_digests(self, drive: int, limit: int) -> list[tuple[str, int]]:
        """The least recently used blobs of drive ``drive``: (digest, size), oldest first."""
        self.flush_touches()
        return [
            (str(r[0]), int(r[1]))
            for r in self._db.execute(
                "SELECT digest, size FROM blobs WHERE drive=? ORDER BY last_access LIMIT ?",
                (drive, limit),
            )
        ]

    def digests_after(self, after: str, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` blobs whose digest sorts after ``after``, in digest order,
        with their sizes (a walk in pages: one page is a short query on the loop)."""
        return [
            (str(r[0]), int(r[1]))
            for r in self._db.execute(
                "SELECT digest, size FROM blobs WHERE digest > ? ORDER BY digest LIMIT ?",
                (after, limit),
            )
        ]

    def all_digests(self) -> dict[str, int]:
        """Every blob the index knows, with its size."""
        return dict(self._db.execute("SELECT digest, size FROM blobs").fetchall())

    def stored_bytes_on(self, drive: int) -> int:
        """Total size of the blobs on drive number ``drive`` (kept in memory: O(1))."""
        return self._usage.get(drive, 0)

    def stored_bytes(self) -> int:
        """Total size of the blobs the index knows."""
        return sum(self._usage.values())
