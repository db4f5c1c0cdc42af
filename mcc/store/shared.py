"""A store shared by the worker processes of one node (``--workers N``).

Theory of operation: every worker opens the same cache directory as a
:class:`SharedStore`, a :class:`~mcc.store.store.Store` that also

- **bumps the directory's generation** (:mod:`.generation`) after every change
  that can make another worker's in-memory view wrong: a block committed, a record
  filed or forgotten, blobs evicted, purged or dropped. A worker compares the
  generation it last saw before it serves from its memo of records and its open
  blob fds (see :mod:`mcc.engine.claimed`), and drops them when it moved;
- **keeps its byte totals from the index**, not from its own writes: the totals
  are summed again from the index when the generation moved (at most every
  :data:`_USAGE_EVERY` seconds, and always before an eviction), so each worker
  sees what every worker stored, and its cached block maps are dropped when the
  generation moved;
- **evicts one worker at a time**: an eviction runs only under
  ``flock(<first drive>/mcc.evict)``; a worker finding it held skips its turn (the
  holder is evicting with the index's own totals, and the next commit past the
  high-water mark wakes an eviction again);
- **never sweeps**: temp files and fill files of live workers are not leftovers.
  The master sweeps both before it starts the workers; only the first start of
  worker 0 reconciles index and blob files (blob files younger than its start are
  never taken for orphans, so the fills of the other workers are safe).

Fill claims (:mod:`.claims`) are made on the first drive, under a name derived from
the block's identity (:func:`fill_name`).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence

from .blobs import BlockWriter, DriveInfo, digest_of
from .claims import Claim, ClaimedWriter, claim
from .generation import Generation
from .records import ObjectMeta
from .store import Store

__all__ = ["EVICT_LOCK_NAME", "SharedStore", "fill_name"]

EVICT_LOCK_NAME = "mcc.evict"
# Totals summed from the index at most this often when other workers change it
# (a SUM over every blob: cheap for thousands, not for every hit)
_USAGE_EVERY = 0.25


def fill_name(key: str, version: str, idx: int) -> str:
    """The claim name of one block's fill (a digest: a plain, fixed-length name)."""
    return digest_of(f"{key}\0{version}\0{idx}".encode())


class SharedStore(Store):
    """A :class:`Store` used by several worker processes at once (see the module).

    Args:
      drives, block_size, verify_on_read, durable, commit_interval, commit_batch: as
        :class:`Store` (which never sweeps temp files here).
      recover: reconcile index and blob files at start (the first worker only).

    Raises:
      OSError: as :class:`Store`, or the generation file cannot be mapped.
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
        recover: bool = True,
    ) -> None:
        super().__init__(
            drives,
            block_size=block_size,
            verify_on_read=verify_on_read,
            durable=durable,
            commit_interval=commit_interval,
            commit_batch=commit_batch,
            sweep=False,
        )
        root = self.drives[0].root
        self.generation = Generation(root)
        self.recover = recover
        self._seen = self.generation.current()  # what our maps, fds and totals reflect
        self.foreign_changes = 0  # how often we saw another worker's changes
        self._usage_stale = False
        self._usage_at = -_USAGE_EVERY  # (the first reload is never held back)
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._evict_fd = os.open(root / EVICT_LOCK_NAME, flags, 0o644)

    def close(self) -> None:
        """Close every file, the generation's mapping and the eviction lock."""
        super().close()
        self.generation.close()
        os.close(self._evict_fd)

    # -- fills ---------------------------------------------------------------------

    def claim_fill(self, meta: ObjectMeta, idx: int) -> Claim:
        """Claim the fill of block ``idx`` of ``meta``'s version (see :func:`.claims.claim`).

        Raises:
          OSError: the fill file cannot be created or locked.
        """
        return claim(self.drives[0].root, fill_name(meta.key, meta.version, idx))

    def claim_name(self, name: str) -> Claim:
        """Claim a fill-like turn named ``name`` (a digest), e.g. a discovery's.

        Raises:
          OSError: as :meth:`claim_fill`.
        """
        return claim(self.drives[0].root, name)

    def claimed_writer(self, held: Claim, previous: BlockWriter | None = None) -> BlockWriter:
        """The writer of a fill we claimed (it takes the claim's fd; ``previous``, a
        file readers may still use, is closed with it)."""
        return ClaimedWriter(self.blobs, held, previous)

    # -- changes the other workers made ---------------------------------------------

    def see_changes(self) -> int:
        """Drop what another worker's changes may have made stale (the cached block
        maps, the cached blob fds: fds in use are closed when handed back, and the
        byte totals); one load from shared memory when nothing moved.

        Returns:
          How many times that happened (a caller keeping memory of its own compares).
        """
        if self.generation.moved(self._seen):
            self._seen = self.generation.current()
            self.foreign_changes += 1
            self.index._maps.clear()  # (rows another worker wrote)
            self._retire_fds()
            self._usage_stale = True
        return self.foreign_changes

    def _retire_fds(self) -> None:
        """Stop handing out the cached blob fds (in use: closed by their last user)."""
        for digest in self.blobs.fds:
            self.blobs.forget_fd(digest)

    def _forget_blob(self, digest: str) -> None:
        self.blobs.forget_fd(digest)  # (its file is going away)
        self._verified.discard(digest)

    def _bump(self) -> None:
        if self.generation.bump() == self._seen + 1:  # ours alone: we are in step
            self._seen += 1

    # -- changes the other workers must see ----------------------------------------

    def block_map(self, meta: ObjectMeta, first: int, last: int) -> dict[int, str]:
        self.see_changes()
        return super().block_map(meta, first, last)

    async def commit(self, meta: ObjectMeta, idx: int, source: BlockWriter | bytes) -> bool:
        stored = await super().commit(meta, idx, source)
        self._bump()
        return stored

    def put_object(self, meta: ObjectMeta) -> bool:
        filed = super().put_object(meta)
        self._bump()
        return filed

    def forget_version(self, meta: ObjectMeta) -> None:
        super().forget_version(meta)
        self._bump()

    async def forget_object(self, key: str) -> bool:
        known = await super().forget_object(key)
        self._bump()
        return known

    def _drop(self, digest: str) -> None:
        super()._drop(digest)  # a blob found missing or corrupt (quarantined)
        self._bump()

    async def evict(self) -> int:
        try:
            fcntl.flock(self._evict_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another worker evicts now
        try:
            self._reload_usage()
            evicted = await super().evict()
        finally:
            fcntl.flock(self._evict_fd, fcntl.LOCK_UN)
        if evicted:
            self._bump()
        return evicted

    async def reconcile(self) -> tuple[int, int]:
        if not self.recover:
            return 0, 0
        self.recover = False  # once: later runs would race the other workers' commits
        return await super().reconcile()

    # -- totals --------------------------------------------------------------------

    def stored_bytes_on(self, drive: int) -> int:
        self._fresh_usage()
        return super().stored_bytes_on(drive)

    def used_bytes_on(self, drive: int) -> int:
        self._fresh_usage()
        return super().used_bytes_on(drive)

    def stored_bytes(self) -> int:
        self._fresh_usage()
        return super().stored_bytes()

    def _fresh_usage(self) -> None:
        self.see_changes()
        if self._usage_stale and time.monotonic() - self._usage_at >= _USAGE_EVERY:
            self._reload_usage()

    def _reload_usage(self) -> None:
        self._usage_stale = False
        self._usage_at = time.monotonic()
        self.index._load_usage()  # (summed from the table)
