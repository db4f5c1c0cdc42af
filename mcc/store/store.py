"""The store: everything mcc keeps on disk, behind one object.

Theory of operation: a :class:`Store` holds the blob files (:mod:`mcc.store.blobs`)
and the sqlite index (:mod:`mcc.store.index`) of one cache, and nothing outside
``mcc/store/`` touches either. It speaks of objects (:class:`ObjectMeta` records) and
blocks, never of SQL or paths.

- **The cache directory carries its own settings**, as diskcache's Settings table
  does: the index's ``meta`` table records the schema version and the block size
  the directory was first filled at. Every object record carries the block size its
  blocks were cut at, so a restart with another ``block_size`` keeps every stored
  object readable at its own size (new objects take the new one). Records written
  before schema 3 carry no size: they take the directory's recorded size.
- **A block is committed in one step** (:meth:`Store.commit`): the block file is
  hashed, installed under its digest (an existing file is trusted only after its
  length and digest check) and indexed. The index row is written after the blob file
  is in place, and a blob file is deleted only after its last row is gone, so a crash
  leaves an orphan file at worst, never a row without its file.
- **Eviction** (least recently used blobs first) keeps each drive under its
  ``max_size`` high-water mark and above ``min_free``; the index's own files count
  against the first drive, and a record left with no block goes with its last blob.
- **Reads are checked** per ``verify_on_read``: a blob that fails its digest is
  quarantined and its rows dropped, so the block is fetched again.
- **A committed block survives a power loss** when ``durable`` is on: its blob is
  fsynced before the rename, its folder and the index's WAL after, in batches
  (:mod:`.commits`).
- :meth:`Store.reconcile` makes index and files agree after an unclean stop
  (:mod:`.recovery`: what it finds, why, and the counts in :attr:`Store.recovery`).

Everything here runs on the trio thread except what is marked as blocking I/O, which
goes to worker threads (hashing, installing, deleting batches, checkpoints, access
times).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from .blobs import BlobStore, BlockWriter, DriveInfo
from .commits import GroupCommit
from .index import Index
from .records import ObjectMeta
from .recovery import RecoveryCounts, reconcile

__all__ = ["Store", "StoreCounters"]

log = logging.getLogger("mcc.store")

# Eviction starts above HIGH_WATER x max_size and stops at LOW_WATER x max_size.
HIGH_WATER = 0.95
LOW_WATER = 0.90
# Blobs evicted per index query, and between two yields to the event loop (each is a
# transaction: 256 in a row held the loop for tens of ms).
_EVICT_BATCH = 256
_EVICT_YIELD = 16
# How often access times are written and the index's WAL checkpointed (see index.py).
_CHECKPOINT_SECONDS = 2.0


@attrs.define
class StoreCounters:
    """What the store counts since it was opened."""

    blocks_stored: int = 0
    store_failures: int = 0
    corrupt_blocks: int = 0
    evictions: int = 0


class Store:
    """The blob files and index of one cache.

    Args:
      drives: the cache drives (the index lives on the first).
      block_size: the block size for new objects (and, in a new or pre-schema-3
        directory, the size recorded as the directory's).
      verify_on_read: ``always``, ``first`` (once per blob per start) or ``never``.
      durable: a committed block survives a power loss (fsyncs, see :mod:`.commits`).
      commit_interval / commit_batch: the group commit's window (seconds) and size.
      sweep: remove temp files left by a crash (off when other processes write).

    Raises:
      OSError: a drive folder cannot be created.
      sqlite3.DatabaseError: the index is not an mcc index, or from a newer mcc.
    """

    def __init__(
        self,
        drives: Sequence[DriveInfo],
        *,
        block_size: int,
        verify_on_read: str = "first",
        durable: bool = True,
        commit_interval: float = 0.002,
        commit_batch: int = 64,
        sweep: bool = True,
    ) -> None:
        self.blobs = BlobStore(drives, durable=durable)
        # start-up recovery, counted (temp files now, the rest in reconcile())
        self.recovery = RecoveryCounts(temp_files=self.blobs.sweep_tmp() if sweep else 0)
        self.index = Index(Path(drives[0].root) / "index.sqlite3")
        self.commits = GroupCommit(
            self.index, durable=durable, interval=commit_interval, batch=commit_batch
        )
        self.block_size = block_size
        self.verify_on_read = verify_on_read
        self.counters = StoreCounters()
        recorded = self.index.setting("block_size")
        if recorded is None:
            self.index.set_setting("block_size", str(block_size))
            recorded = str(block_size)
        self.directory_block_size = int(recorded)
        if self.directory_block_size != block_size:
            log.info(
                "cache directory %s was filled with %d-byte blocks; stored objects keep "
                "their block size, new objects use %d",
                drives[0].root,
                self.directory_block_size,
                block_size,
            )
        self.started = time.time()
        self._verified: set[str] = set()
        self._pinned: dict[str, int] = {}
        self._evict_wanted = trio.Event()
        self._reconciled = trio.Event()

    async def wait_reconciled(self) -> None:
        """Wait until the start-up :meth:`reconcile` has run."""
        await self._reconciled.wait()

    @property
    def drives(self) -> tuple[DriveInfo, ...]:
        return self.blobs.drives

    def close(self) -> None:
        """Close every file and the index."""
        self.blobs.close()
        self.index.close()

    # -- objects -------------------------------------------------------------------

    def get_object(self, key: str) -> ObjectMeta | None:
        """The stored record of ``key`` (its block size filled in), or None."""
        meta = self.index.get_object(key)
        if meta is not None and not meta.block_size:
            meta = attrs.evolve(meta, block_size=self.directory_block_size)
        return meta

    def put_object(self, meta: ObjectMeta) -> bool:
        """File ``meta`` (another version of the key goes, with its blocks); False when
        the index could not be written (a full disk: the object is served unstored)."""
        try:
            freed = self.index.put_object(meta)
        except OSError as exc:
            self.counters.store_failures += 1
            log.warning("could not record %s in the index: %s", meta.key, exc)
            return False
        self._delete_now(freed)
        self._maybe_evict(0)  # records take room on the first drive
        return True

    def forget_version(self, meta: ObjectMeta) -> None:
        """Drop ``meta``'s version when it is still the stored one (it changed upstream)."""
        current = self.index.get_object(meta.key)
        if current is not None and current.version == meta.version:
            self._delete_now(self.index.delete_object(meta.key))

    async def forget_object(self, key: str) -> bool:
        """Forget ``key`` and delete the blobs no other object shares; True if it was
        stored."""
        known = self.index.get_object(key) is not None
        await self.delete_blobs(self.index.delete_object(key))
        return known

    def object_keys(self) -> list[str]:
        """Every stored object's key."""
        return self.index.object_keys()

    # -- blocks --------------------------------------------------------------------

    def block_map(self, meta: ObjectMeta, first: int, last: int) -> dict[int, str]:
        """Digests of the stored blocks ``first..last`` of ``meta``'s version."""
        return self.index.get_blocks(meta.key, meta.version, first, last)

    def readable(self, digest: str) -> bool:
        """True when a stored blob can be read now (an fd is open, or its file is there)."""
        return self.blobs.is_open(digest) or self.blobs.exists(digest)

    def writer(self) -> BlockWriter:
        """A new block file to fill.

        Raises:
          OSError: it cannot be created (a full or read-only drive).
        """
        return self.blobs.writer()

    async def commit(self, meta: ObjectMeta, idx: int, source: BlockWriter | bytes) -> bool:
        """Store block ``idx`` of ``meta``: hash, install and index as one step (the
        blocking part in a worker thread). ``source`` is the filled block file, or the
        bytes of a block its drive could not take.

        Returns:
          True when the block is stored; False when it could not be (counted, logged)
          or its version is no longer current.
        """
        # shielded: a few fsyncs at most, and a flight must not outlive its commit
        with trio.CancelScope(shield=True):
            digest: str | None = None
            try:
                if isinstance(source, BlockWriter):
                    digest = await trio.to_thread.run_sync(source.commit)
                    length, dirs = source.length, source.dirs
                else:
                    put = await trio.to_thread.run_sync(self.blobs.put_durably, source)
                    digest, dirs = put[0], put[1]
                    length = len(source)
                drive = self.blobs.drive_index(digest)
                row = (meta.key, meta.version, idx, digest, length, drive)
                freed = await self.commits.commit(row, dirs)
            except OSError as exc:
                self.counters.store_failures += 1
                log.warning("could not store block %d of %s: %s", idx, meta.key, exc)
                if digest is not None and not self.index.is_referenced(digest):
                    await self.delete_blobs([digest])
                return False
            if freed is None:  # the version is gone already
                if not self.index.is_referenced(digest):
                    await self.delete_blobs([digest])
                return False
            self.counters.blocks_stored += 1
            self._verified.add(digest)
            self._maybe_evict(drive)
            await self.delete_blobs(freed)
            return True
        return False  # not reached: a shielded scope is never cancelled

    async def open_block(self, digest: str) -> int | None:
        """An fd of a stored blob, checked against its name per ``verify_on_read``;
        None when it is missing or corrupt (its rows are dropped: fetch it again).
        Hand the fd back with :meth:`release`."""
        try:
            fd = self.blobs.acquire(digest)
        except FileNotFoundError:
            # expected when eviction removed it after the caller looked it up
            log.info("blob %s is missing from disk: refetching", digest)
            self._drop(digest)
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # something planted a symlink where the blob was: never read through it
            self.condemn(digest, "is a symlink on disk")
            return None
        mode = self.verify_on_read
        if mode == "always" or (mode == "first" and digest not in self._verified):
            ok = await trio.to_thread.run_sync(self.blobs.verify, digest, fd)
            if not ok:
                self.blobs.release(digest, fd)
                self.condemn(digest, "does not match its digest")
                return None
            self._verified.add(digest)
        return fd

    def release(self, digest: str, fd: int) -> None:
        """Hand back an fd from :meth:`open_block`."""
        self.blobs.release(digest, fd)

    def quarantine(self, digest: str) -> bool:
        """Stop serving a blob found corrupt: moved aside, its rows dropped; True
        when its file was there to move."""
        moved = self.blobs.quarantine(digest)
        self._drop(digest)
        return moved

    def condemn(self, digest: str, why: str) -> None:
        """Quarantine a blob found corrupt, counted and logged once however many
        checks (a read, the scrub) found it at the same time."""
        if self.quarantine(digest):
            self.counters.corrupt_blocks += 1
            log.warning("blob %s %s: quarantined, refetching", digest, why)

    @contextmanager
    def pin(self, digest: str) -> Iterator[None]:
        """Keep eviction away from ``digest`` while it is being sent."""
        self._pinned[digest] = self._pinned.get(digest, 0) + 1
        try:
            yield
        finally:
            self._pinned[digest] -= 1
            if not self._pinned[digest]:
                del self._pinned[digest]

    def touch(self, digests: set[str]) -> None:
        """Record a read of these blobs (for least-recently-used eviction)."""
        try:
            self.index.touch(digests)
        except OSError as exc:  # only the LRU order suffers
            log.debug("could not record access times: %s", exc)

    def stored_bytes_on(self, drive: int) -> int:
        """Bytes of blobs on drive number ``drive``."""
        return self.index.stored_bytes_on(drive)

    def used_bytes_on(self, drive: int) -> int:
        """What counts against drive ``drive``'s ``max_size``: its blobs, and on the
        first drive the index's own files."""
        used = self.index.stored_bytes_on(drive)
        if drive == 0:
            used += self.index.file_bytes()
        return used

    def stored_bytes(self) -> int:
        """Bytes of blobs on every drive."""
        return self.index.stored_bytes()

    def _drop(self, digest: str) -> None:
        self._verified.discard(digest)
        try:
            self.index.drop_digest(digest)
        except OSError as exc:  # disk full: the row stays; reads refetch around it
            log.warning("could not drop blob %s from the index: %s", digest, exc)

    # -- upkeep --------------------------------------------------------------------

    async def run_maintenance(self) -> None:
        """Background upkeep for the store's whole life: first :meth:`reconcile`, then
        eviction whenever a drive passes its high-water mark, and (in a task of its
        own, so a slow checkpoint never holds eviction back) access times and WAL
        checkpoints every 2 s."""
        await self.reconcile()
        self._reconciled.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints)
            while True:
                await self._evict_wanted.wait()
                self._evict_wanted = trio.Event()
                await self.evict()

    async def _checkpoints(self) -> None:
        while True:
            await trio.sleep(_CHECKPOINT_SECONDS)
            await self.write_touches()
            await trio.to_thread.run_sync(self.index.checkpoint)
            self._maybe_evict(0)  # the index grows too

    async def write_touches(self) -> None:
        """Write the access times recorded since the last time, in a worker thread on
        a connection of its own (a few thousand rows took tens of ms on the loop)."""
        pending = self.index.take_touches()
        if not pending:
            return
        try:
            await trio.to_thread.run_sync(self.index.write_touches, pending)
        except OSError as exc:  # only the LRU order suffers
            log.debug("could not record access times: %s", exc)

    async def reconcile(self) -> tuple[int, int]:
        """Make the index and the blob files agree after a crash (see
        :func:`.recovery.reconcile`); the first run's counts go to :attr:`recovery`.

        Returns:
          (rows dropped, orphan files deleted).
        """
        first = not self._reconciled.is_set()
        return await reconcile(self, self.recovery if first else None)

    async def evict(self) -> int:
        """Bring every drive above its high-water mark (or below its min_free) down to
        the low-water mark, least recently used blobs first; returns blobs evicted.
        Blobs being sent are skipped (deleting an open file would not disturb its
        reader anyway). Records left without blocks go too, and when blobs alone
        cannot make room (an index grown by many small objects), records without
        blocks are dropped oldest first."""
        evicted = 0
        await self.write_touches()  # off the loop: the LRU query below then flushes little
        for i, drive in enumerate(self.blobs.drives):
            used = self.used_bytes_on(i)
            free = self.blobs.free_space(drive)  # one statvfs: never queued behind fsyncs
            target = used
            if used > drive.max_size * HIGH_WATER:
                target = int(drive.max_size * LOW_WATER)
            if free < drive.min_free:
                # free the deficit plus a tenth of the floor, so it does not flap
                target = min(target, used - (drive.min_free - free) - drive.min_free // 10)
            while used > target:
                batch = [
                    (d, size)
                    for d, size in self.index.lru_digests(i, _EVICT_BATCH + len(self._pinned))
                    if d not in self._pinned
                ][:_EVICT_BATCH]
                if not batch:
                    if i == 0 and self.index.drop_empty_objects(_EVICT_BATCH):
                        used = self.used_bytes_on(i)
                        continue
                    break
                for n, (digest, size) in enumerate(batch, 1):
                    self.index.drop_digest(digest, empty_objects=True)
                    used -= size
                    evicted += 1
                    if n % _EVICT_YIELD == 0:  # one transaction each: let requests run
                        await trio.lowlevel.checkpoint()
                    if used <= target:
                        batch = batch[: batch.index((digest, size)) + 1]
                        break
                await self.delete_blobs([d for d, _ in batch])
        if evicted:
            self.counters.evictions += evicted
            log.info("evicted %d blobs to stay under max_size/min_free", evicted)
        return evicted

    def _maybe_evict(self, drive: int) -> None:
        """Wake the eviction task when ``drive`` passed its high-water mark."""
        d = self.blobs.drives[drive]
        if self.used_bytes_on(drive) > d.max_size * HIGH_WATER:
            self._evict_wanted.set()

    def _forget_blob(self, digest: str) -> None:
        # on the trio thread, which owns the fd cache
        self.blobs.forget_fd(digest)
        self._verified.discard(digest)

    def _delete_now(self, digests: list[str]) -> None:
        """Delete blobs on this thread (a few unlinks: a changed object)."""
        for d in digests:
            self._forget_blob(d)
            self.blobs.delete(d)

    async def delete_blobs(self, digests: list[str]) -> None:
        """Delete blobs in a worker thread (eviction and other batches)."""
        for d in digests:
            self._forget_blob(d)
        if digests:
            await trio.to_thread.run_sync(lambda: [self.blobs.delete(d) for d in digests])
