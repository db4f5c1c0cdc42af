"""Fills shared by the worker processes of one node (``--workers N``): the block file
as the meeting point.

Theory of operation: when the engine's store is a :class:`~mcc.store.shared.
SharedStore`, a new flight first claims its block's fill file
(:mod:`mcc.store.claims`); with a plain store nothing here runs and a flight writes
a private temp file, as a single process does.

- **Filler** (the claim's lock is ours): the flight writes through the claim's
  writer and its fetch runs as any other (:mod:`.fill`). The writer keeps the
  fill's name until the block's index row is written, so a worker asking in between
  follows instead of fetching the block again.
- **Follower** (another worker fills it): the flight has no fetch. A follow task
  polls the file every :data:`POLL_SECONDS` and advances the flight to the file's
  size, all but the last byte until the file is marked done (a body not framed by
  Content-Length is vouched for only at its end). Local readers read the flight
  like any other: they do not know who fills it. The task ends when the fill is
  done (then, once its index row is there or :data:`ROW_WAIT_SECONDS` passed, the
  flight leaves the table; a filler that died after the block was done, before its
  row, leaves it to the follower to store) or abandoned or orphaned (a filler that gave up or
  died): it claims again and either follows the new filler or becomes the filler
  itself, the fill starting over at byte 0 on a new file (readers wait for the
  bytes they have not had; the bytes they had were the same object version's).
- A filler's claim made just after another worker stored the block finds the row:
  the flight is complete at once, read from the stored blob.
- **Discovery**: the first readers of an unknown or stale object take a turn per
  key (a claim named after the key): one worker discovers, the others wait until
  its record is filed and use it (:meth:`Claiming._discovery_turn`).
- **Coherence**: every change to the store bumps its generation; before a lookup,
  a worker that sees it moved drops its memo of records and its cached blob fds
  (:meth:`Claiming._see_changes`), so a blob evicted or purged by another worker
  is never served from them.

Every follow loop is bounded: by :data:`MAX_CLAIMS` claims per flight, and by the
stall timeout for a filler whose file stops growing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import UpstreamError
from ..store.blobs import BlockWriter
from ..store.claims import DONE_MODE, Claim, Follow, Role
from ..store.records import ObjectMeta
from ..store.shared import SharedStore, fill_name
from .flight import Fetch, Flight
from .parts import RecordMemo
from .streams import Streaming

__all__ = ["MAX_CLAIMS", "POLL_SECONDS", "ROW_WAIT_SECONDS", "Claiming", "FollowedFile"]

log = logging.getLogger("mcc.engine")

# How often a follower looks at a fill file another worker writes: a reader in this
# worker sees new bytes at most this late (a few ms, beside the fill's own pace)
POLL_SECONDS = 0.003
# Polls between full looks at the filler's state (lock and name: 3 system calls)
_STATE_EVERY = 8
# Claims a flight makes before it fails (each one means another worker moved on)
MAX_CLAIMS = 8
# Longest a follower keeps a done block in its table waiting for the filler's row
ROW_WAIT_SECONDS = 5.0


class FollowedFile(BlockWriter):
    """The file of a block another worker fills (or a stored blob): readable only.

    Args:
      fd: open on the file; closed with this object.
      held: the follower's claim (None for a stored blob).
      previous: a file readers may still use; closed with this one.
    """

    def __init__(self, fd: int, held: Claim | None, previous: BlockWriter | None = None) -> None:
        self.path = held.path if held is not None else Path(os.devnull)
        self.fd = fd
        self.length = 0
        self.digest = None
        self.dirs = ()
        self._closed = False
        self.claim = held
        self._previous = previous

    def write(self, data: bytes | bytearray | memoryview, at: int | None = None) -> None:
        """Never: another worker writes this file."""
        raise OSError(errno.EBADF, "another worker fills this block")

    def commit(self) -> str:
        """Never: another worker commits this file."""
        raise OSError(errno.EBADF, "another worker fills this block")

    def close(self) -> None:
        """Close the fd (and the previous file's)."""
        if self._closed:
            return
        self._closed = True
        if self.claim is not None:
            self.claim.close()
        else:
            os.close(self.fd)
        if self._previous is not None:
            self._previous.close()


class Claiming(Streaming):
    """The engine's part in fills shared across worker processes (see the module)."""

    _seen_changes = 0

    if TYPE_CHECKING:  # Filling's (mcc.engine.fill), which this part is mixed into

        async def _run_fetch(
            self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]
        ) -> None: ...

        def _retire(self, flight: Flight) -> None: ...

    def _shared(self) -> SharedStore | None:
        store = self.store
        return store if isinstance(store, SharedStore) else None

    @staticmethod
    def _followed(flight: Flight) -> bool:
        """True when another worker fills ``flight`` (it gets no fetch here)."""
        return isinstance(flight.writer, FollowedFile)

    # -- coherence -----------------------------------------------------------------

    def _see_changes(self) -> None:
        """Drop what another worker's change may have made stale: the memo of records,
        and the store's cached block maps and blob fds (one load from shared memory
        when nothing moved)."""
        shared = self._shared()
        if shared is None:
            return
        seen = shared.see_changes()  # (the store drops its block maps and fds)
        if seen != self._seen_changes:
            self._seen_changes = seen
            self._metas = RecordMemo(self._metas.limit)

    # -- claiming a block ------------------------------------------------------------

    def _block_opener(self, meta: ObjectMeta, idx: int) -> Callable[[], BlockWriter]:
        """What a new flight for block ``idx`` writes (or follows): a private temp
        file; with a shared store, the claimed fill file or another worker's."""
        shared = self._shared()
        if shared is None:
            return self.store.writer
        try:
            held = shared.claim_fill(meta, idx)
        except OSError as exc:  # a full or read-only drive: an unshared fill
            log.warning("could not claim block %d of %s: %s", idx, meta.key, exc)
            return self.store.writer
        writer = self._claimed(shared, meta, idx, held, None)
        return lambda: writer

    def _claimed(
        self,
        shared: SharedStore,
        meta: ObjectMeta,
        idx: int,
        held: Claim,
        previous: BlockWriter | None,
    ) -> BlockWriter:
        """The writer for a claim just made: followed, ours to fill, or the stored
        blob when the block was stored just before the claim."""
        digest = self.store.block_map(meta, idx, idx).get(idx)
        if digest is not None:
            try:
                fd = self.store.blobs.open(digest)
            except OSError:
                pass  # gone again: fill or follow it
            else:
                if held.role is Role.FOLLOW:
                    held.close()
                else:
                    shared.claimed_writer(held).close()  # (removes our empty fill file)
                # (``previous`` stays open with the new file: readers may be using it)
                return FollowedFile(fd, None, previous)
        if held.role is Role.FOLLOW:
            return FollowedFile(held.fd, held, previous)
        return shared.claimed_writer(held, previous)

    def _follow_soon(self, meta: ObjectMeta, flight: Flight, via: tuple[str, ...]) -> None:
        """Start following ``flight``'s file, filled by another worker."""
        self._spawn(self._follow, meta, flight, via)

    async def _follow(self, meta: ObjectMeta, flight: Flight, via: tuple[str, ...]) -> None:
        """Advance ``flight`` as another worker fills its file; claim again (follow
        the next filler or take over) when that one gave up or died."""
        idx = flight.key.index
        try:
            for _ in range(MAX_CLAIMS):
                state = await self._follow_file(meta, flight)
                if state is Follow.DONE:
                    await self._wait_row(meta, flight)
                    return
                shared = self._shared()
                assert shared is not None
                held = shared.claim_fill(meta, idx)
                writer = self._claimed(shared, meta, idx, held, flight.writer)
                if isinstance(writer, FollowedFile):
                    flight.advance(0, writer)
                    continue
                log.info("block %d of %s: taking over a fill another worker left", idx, meta.key)
                flight.advance(0, writer)
                await self._run_fetch(meta, Fetch([flight]), via)  # it retires the flight
                return
            why = UpstreamError(f"{meta.key}: block {idx} kept changing fillers")
        except OSError as exc:
            why = UpstreamError(f"{meta.key}: block {idx}: cannot follow its fill: {exc}")
        log.warning("%s", why)
        flight.fail(why)
        if flight.complete or flight.error is not None:
            self._retire(flight)

    async def _follow_file(self, meta: ObjectMeta, flight: Flight) -> Follow:
        """Advance ``flight`` with its file's size until the fill ends; how it ended
        (abandoned, too, when the block got stored though the file is not done: a
        filler whose drive was full stores it from memory)."""
        writer = flight.writer
        assert isinstance(writer, FollowedFile)
        if writer.claim is None:  # a stored blob
            flight.advance(flight.length)
            return Follow.DONE
        stall = self.config.timeouts.stall + self.config.timeouts.read
        grew_at = trio.current_time()
        last = -1
        polls = 0
        while True:
            st = os.fstat(writer.fd)
            if stat.S_IMODE(st.st_mode) == DONE_MODE:
                if st.st_size != flight.length:  # not the block we expect: fill again
                    return Follow.ORPHANED
                flight.advance(flight.length)
                return Follow.DONE
            if st.st_size != last:
                last, grew_at = st.st_size, trio.current_time()
                if st.st_size > flight.filled:
                    flight.advance(min(st.st_size, flight.length - 1))
            polls += 1
            if polls % _STATE_EVERY == 0:
                state = writer.claim.state()
                if state is not Follow.GROWING and state is not Follow.DONE:
                    return state
                idx = flight.key.index
                if self.store.block_map(meta, idx, idx):
                    return Follow.ABANDONED  # (claimed again: the stored blob is used)
            if trio.current_time() - grew_at > stall:
                raise OSError(errno.ETIMEDOUT, f"no progress for {stall:.0f} s")
            await trio.sleep(POLL_SECONDS)

    async def _wait_row(self, meta: ObjectMeta, flight: Flight) -> None:
        """Keep a followed block that is done in the table until its row is written
        (bounded): a reader here joins it rather than claim it again. A filler that
        died between marking the block done and writing its row leaves the complete
        block to us: stored from here rather than fetched again."""
        writer = flight.writer
        assert isinstance(writer, FollowedFile)
        idx = flight.key.index
        for polls in range(int(ROW_WAIT_SECONDS / POLL_SECONDS) + 1):  # (another process)
            if self.store.block_map(meta, idx, idx):
                break
            held = writer.claim
            if polls % _STATE_EVERY == 0 and held is not None and not held.filler_alive():
                data = await trio.to_thread.run_sync(os.pread, writer.fd, flight.length, 0)
                if len(data) == flight.length and await self.store.commit(meta, idx, data):
                    # (a filler whose commit was refused, its version purged, lets go
                    # too: then this one is refused as well, and nothing is said)
                    log.info("block %d of %s: stored a fill its filler left", idx, meta.key)
                break
            await trio.sleep(POLL_SECONDS)
        self._retire(flight)

    # -- discovery turns -------------------------------------------------------------

    async def _discovery_turn(
        self, key: str, stale: ObjectMeta | None, done: trio.Event
    ) -> ObjectMeta | None:
        """Take this worker's turn to discover ``key``: None when it is ours (it ends
        when ``done`` is set), or the record another worker filed meanwhile."""
        shared = self._shared()
        if shared is None:
            return None
        name = fill_name(key, "discovery", 0)
        for _ in range(MAX_CLAIMS):
            found = self._newer_record(shared, key, stale)
            if found is not None:
                return found
            try:
                held = shared.claim_name(name)
            except OSError as exc:
                log.warning("could not claim the discovery of %s: %s", key, exc)
                return None
            if held.role is Role.FILL:
                found = self._newer_record(shared, key, stale)
                writer = shared.claimed_writer(held)
                if found is not None:
                    writer.close()
                    return found
                self._spawn(_end_turn, writer, done)
                return None
            try:
                await self._wait_turn(held)
            finally:
                held.close()
        return None

    async def _wait_turn(self, held: Claim) -> None:
        stall = self.config.timeouts.stall + self.config.timeouts.read
        for _ in range(int(stall / POLL_SECONDS) + 1):  # (another process: no Event)
            if held.state() is not Follow.GROWING:
                break
            await trio.sleep(POLL_SECONDS)

    def _newer_record(
        self, shared: SharedStore, key: str, stale: ObjectMeta | None
    ) -> ObjectMeta | None:
        found = shared.get_object(key)
        if found is None or (
            stale is not None
            and (found.version, found.fetched_at) == (stale.version, stale.fetched_at)
        ):
            return None
        self._metas.put(found)
        return found


async def _end_turn(writer: BlockWriter, done: trio.Event) -> None:
    try:
        await done.wait()
    finally:
        writer.close()
