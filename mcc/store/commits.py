"""Group commit: blocks completed close together become durable together.

Theory of operation: a block is durable before anything points at it. Its bytes are
written to a temp file, the file is fsynced and renamed to its blob name (all in
:meth:`~mcc.store.blobs.BlockWriter.commit`, in the filling task's worker thread);
then, here, its blob folder is fsynced (so the rename survives a power loss), its
index row is inserted and the index's WAL fsynced. The last two steps are what one
disk flush per block would cost, so they are shared: the rows waiting when a flush
starts go in one transaction, their folders are fsynced once each, and the WAL once.

There is no background task. The first committer that finds nobody flushing becomes
the *leader*: it waits up to ``interval`` for more rows (or until ``batch`` rows
wait), then flushes everything waiting and wakes the others; the flush is shielded
from cancellation (a few fsyncs), so a leader that goes away mid-flush never strands
its followers. A follower still waiting when a flush ends without its row leads the
next one. A committer cancelled before its row was taken withdraws it.

A reader never waits on any of this: until :meth:`GroupCommit.commit` returns, the
engine keeps the block's flight in its table and serves the block from the flight's
file, which holds every byte already.

With ``durable`` off nothing is fsynced and each row is inserted at once (the page
cache carries everything; a power loss may then leave rows naming empty blobs, which
the start-up recovery drops and the verify-on-read check quarantines).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs
import trio

from .blobs import FaultHook, fsync_dir
from .index import Index

__all__ = ["GroupCommit", "Row"]

# (key, version, block index, digest, size, drive), as Index.add_blocks takes them.
Row = tuple[str, str, int, str, int, int]


@attrs.define(eq=False)
class _Entry:
    row: Row
    dirs: tuple[Path, ...]
    result: list[str] | None = None
    error: OSError | None = None
    done: bool = False


class GroupCommit:
    """Makes block rows durable in batches (see the module).

    Args:
      index: the index the rows go to.
      durable: fsync folders and the WAL before a commit returns.
      interval: seconds a leader waits for more rows before flushing.
      batch: rows that start a flush without waiting out the interval.
      fault: called at each :data:`Step` (tests only).
    """

    def __init__(
        self,
        index: Index,
        *,
        durable: bool = True,
        interval: float = 0.002,
        batch: int = 64,
        fault: FaultHook | None = None,
    ) -> None:
        self.index = index
        self.durable = durable
        self.interval = interval
        self.batch = max(1, batch)
        self.fault = fault
        self.flushes = 0  # batches flushed (rows / flushes = the batching achieved)
        self.rows = 0
        self._waiting: list[_Entry] = []
        self._leading = False
        self._full = trio.Event()
        self._flushed = trio.Event()

    async def commit(self, row: Row, dirs: Iterable[Path]) -> list[str] | None:
        """Make ``row`` durable (its blob is durable under its name already; ``dirs``
        are the folders whose entries changed to put it there).

        Returns:
          What :meth:`Index.add_block` returns: None when the object version is gone.

        Raises:
          OSError: the index or a folder could not be written or synced.
        """
        if not self.durable:
            self.rows += 1
            self.flushes += 1
            return self.index.add_block(*row)
        entry = _Entry(row, tuple(dirs))
        self._waiting.append(entry)
        if len(self._waiting) >= self.batch:
            self._full.set()
        try:
            # each turn ends one flush, which takes the first ``batch`` rows waiting:
            # this row's flush ends within the one running now, (its place in the queue
            # // batch) more, and its own
            for _ in range(len(self._waiting) // self.batch + 3):
                if entry.done:
                    break
                if self._leading:
                    await self._flushed.wait()
                else:
                    await self._lead()
            if not entry.done:
                raise AssertionError("a group commit left a row behind")
        except BaseException:
            if entry in self._waiting:  # not taken yet: withdraw it
                self._waiting.remove(entry)
            raise
        if entry.error is not None:
            raise entry.error
        return entry.result

    async def _lead(self) -> None:
        self._leading = True
        try:
            with trio.CancelScope(shield=True):
                if len(self._waiting) < self.batch:
                    with trio.move_on_after(self.interval):
                        await self._full.wait()
                taken, self._waiting = self._waiting[: self.batch], self._waiting[self.batch :]
                self._full = trio.Event()
                if len(self._waiting) >= self.batch:
                    self._full.set()
                await self._flush(taken)
        finally:
            self._leading = False
            self._flushed.set()
            self._flushed = trio.Event()

    async def _flush(self, taken: list[_Entry]) -> None:
        dirs = {d for e in taken for d in e.dirs}
        try:
            await trio.to_thread.run_sync(_fsync_dirs, dirs)
            results = self.index.add_blocks([e.row for e in taken])
            if self.fault is not None:
                self.fault("indexed")
            await trio.to_thread.run_sync(self.index.sync)
        except BaseException as exc:
            # (a fault hook's crash, a bug): nobody may wait for these rows forever
            error = exc if isinstance(exc, OSError) else OSError(f"commit failed: {exc!r}")
            for e in taken:
                e.error, e.done = error, True
            if isinstance(exc, OSError):
                return
            raise
        self.flushes += 1
        self.rows += len(taken)
        for e, result in zip(taken, results, strict=True):
            e.result, e.done = result, True


def _fsync_dirs(dirs: Iterable[Path]) -> None:
    for d in dirs:
        fsync_dir(d)
