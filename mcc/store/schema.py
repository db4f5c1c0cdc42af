"""The index's schema: how a database is opened, created and migrated.

Theory of operation: the schema is created in one transaction together with its
version row, and that transaction is committed with ``synchronous=FULL`` (the WAL
is fsynced before the commit returns), so a power loss right after the first start
finds either no tables at all or all of them with their version: never a database
that lost its schema while its rows live on (seen on main before: the tables gone,
and recreated empty, after a power cut). Migrations run the same way, one durable
transaction per step.

Ordinary commits then run with ``synchronous=NORMAL`` (see :mod:`mcc.store.index`):
in WAL mode that never corrupts the database, and the store makes its block rows
durable itself, in batches (:mod:`mcc.store.commits`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from .blobs import fsync_dir

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Tx", "open_database"]

SCHEMA_VERSION = 3
# Bytes a checkpointed WAL file keeps (it counts against the drive's max_size).
WAL_LIMIT = 4 * 1024 * 1024

# Migrations: MIGRATIONS[n] turns a schema-n database into schema n+1. A cache
# written by an older mcc is upgraded in place when opened; a newer one is refused.
MIGRATIONS: dict[int, str] = {
    # 2: least-recently-used eviction walks blobs per drive by access time
    1: "CREATE INDEX IF NOT EXISTS blobs_by_drive_access ON blobs (drive, last_access);",
    # 3: each object keeps the URL it is fetched from (after redirects) and the block
    # size it was cut at; 0 means "the directory's block size before schema 3", which
    # the store records in the settings (table meta) when it migrates
    2: "ALTER TABLE objects ADD COLUMN fetch_url TEXT;"
    "ALTER TABLE objects ADD COLUMN block_size INTEGER NOT NULL DEFAULT 0;",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    size INTEGER NOT NULL,
    etag TEXT,
    last_modified TEXT,
    content_type TEXT,
    headers TEXT NOT NULL,
    fetched_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    key TEXT NOT NULL,
    version TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (key, version, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_digest ON blocks (digest);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    drive INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_access ON blobs (last_access);
"""
# _SCHEMA is schema 1; MIGRATIONS bring it to SCHEMA_VERSION.


def open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    """Open (creating or migrating) the index database at ``path``.

    Returns:
      The connection (WAL, ``synchronous=NORMAL``, no automatic checkpoints) and
      the schema version the file had when opened (1 for a new file).

    Raises:
      sqlite3.DatabaseError: the file is not an mcc index, or is from a newer mcc.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("PRAGMA wal_autocheckpoint=0")  # see Index.checkpoint()
        # a checkpointed WAL is cut back to this size instead of keeping its peak
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        db.execute("PRAGMA synchronous=FULL")  # schema and migrations: durable
        found = _create(db)
        version = found
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path}: index schema {version} is newer than this mcc understands "
                f"({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                version += 1
                db.execute("UPDATE meta SET value=? WHERE name='schema'", (str(version),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        db.execute("PRAGMA synchronous=NORMAL")
        fsync_dir(path.parent)  # the database and WAL files' own names, on a new cache
    except BaseException:
        db.close()
        raise
    return db, found


def _create(db: sqlite3.Connection) -> int:
    """Create the schema-1 tables and their version row in one transaction (a no-op
    on an existing index); returns the schema version found."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta (name, value) VALUES ('schema', '1')")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return 1 if row is None else int(row[0])


class Tx:
    """BEGIN IMMEDIATE; then COMMIT on success, ROLLBACK on any exception.

    The connection runs with ``isolation_level=None`` (sqlite3 opens no transaction
    by itself), so each multi-statement change is wrapped in one of these.
    IMMEDIATE takes the write lock first, waiting (the busy timeout) while another
    connection holds it (the access-time writer, :mod:`.touches`, or another worker
    of ``--workers``): a deferred transaction that read first could not take it after
    that writer committed ("database is locked" at once, the wait skipped:
    SQLITE_BUSY_SNAPSHOT).
    """

    def __init__(self, db: sqlite3.Connection, on_rollback: Callable[[], None]) -> None:
        self._db = db
        self._on_rollback = on_rollback

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()  # a failed COMMIT (disk full) may leave it open
                raise
        self._rollback()

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        finally:
            self._on_rollback()  # the in-memory mirrors may have moved
