"""Block fills: which blocks to fetch, who waits on whom, and where bytes go.

Theory of operation: a reader that needs block ``i`` of a record either finds it
stored, joins the :class:`~mcc.engine.flight.Flight` already fetching it, or starts
one (plus up to ``readahead_blocks`` further blocks, each its own fetch). A
:class:`~mcc.engine.flight.Fetch` is one upstream request filling consecutive
flights; it runs as a task in the engine's nursery, never a reader's, so a reader
hanging up cannot fail the others. The body comes from
:meth:`~mcc.upstream.fetch.Fetcher.fetch`, which vouches that every byte lies in the
span asked; this module only places bytes into flights and hands complete blocks to
the store, each in a task of the fill's own nursery: the body keeps coming while the
store makes a block durable, and the block's flight stays in the table (serving its
readers from its file) until that commit ends. A broken fetch resumes where its
bytes stopped (If-Range), within ``upstream_retries``; an object that changed
upstream fails its flights with :class:`~mcc.errors.VersionChanged`, never mixing
versions.

A fetch whose readers all left is an *orphan*; it keeps going (so the block is
stored) unless more than ``max_orphan_flights`` orphans exist.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from .. import policy
from ..errors import UpstreamError, VersionChanged
from ..store.records import ObjectMeta
from ..upstream.fetch import Conditions, Fetched
from .blocks import block_bounds
from .flight import Fetch, Flight, FlightKey
from .parts import EngineParts

__all__ = ["Filling"]

log = logging.getLogger("mcc.engine")

# Bytes asked of upstream per receive: one such buffer per fetch is all the memory a
# fill holds (its bytes go to the block file), so a fill's RAM does not depend on the
# block size or on how fast its readers read.
_RECEIVE_BUFFER = 256 * 1024
# Retry backoff for block fetches: 0.1 s, 0.2 s, 0.4 s... capped at 2 s.
_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 2.0


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    return float(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


class Filling(EngineParts):
    """The engine's block fills (see the module)."""

    # -- claims: plain synchronous bookkeeping, no await between look and change -----

    def _claim_ahead(
        self,
        meta: ObjectMeta,
        idx: int,
        last: int,
        stored: dict[int, str],
        claims: dict[int, Flight],
        via: Sequence[str],
        reader: object | None,
    ) -> bool:
        """Make sure blocks ``idx..idx+readahead`` (up to ``last``) are stored or claimed.

        Returns:
          True when a flight another reader started was joined.
        """
        joined = False
        for j in range(idx, min(last, idx + self.config.readahead_blocks) + 1):
            if j in stored or j in claims:
                continue
            if self._flights.get(FlightKey(meta.key, meta.version, j)) is None:
                again = self.store.block_map(meta, j, j)
                if again:  # stored since the caller looked
                    stored.update(again)
                    continue
            claims[j], was_joined = self._claim_missing(meta, j, via, reader)
            joined |= was_joined
        return joined

    def _claim_missing(
        self, meta: ObjectMeta, idx: int, via: Sequence[str], reader: object | None
    ) -> tuple[Flight, bool]:
        """Join block ``idx``'s flight, or start one, without asking the store (whose
        row for it may be stale when the blob turned out missing or corrupt).

        Returns:
          The flight, now with one more waiter, and True when it was joined from
          another reader rather than started here.
        """
        flight = self._flights.get(FlightKey(meta.key, meta.version, idx))
        if flight is None:
            flight = self._new_flight(meta, idx, reader)
            self._spawn(self._run_fetch, meta, Fetch([flight]), tuple(via))
            joined = False
        else:
            if flight.fetch is not None:
                self._orphans.discard(flight.fetch)
            joined = reader is None or flight.starter is not reader
        flight.waiters += 1
        return flight, joined

    def _new_flight(self, meta: ObjectMeta, idx: int, reader: object | None) -> Flight:
        """A flight for block ``idx``, registered in the table (no fetch attached yet)."""
        b_start, b_end = block_bounds(idx, meta.block_size, meta.size)
        flight = Flight(
            FlightKey(meta.key, meta.version, idx),
            b_start,
            b_end - b_start,
            self.store.writer,
            self.memory,
        )
        flight.starter = reader
        self._flights.add(flight)
        return flight

    def _release(self, flight: Flight) -> None:
        """A reader is done with ``flight``; an unread fetch may become an orphan."""
        flight.waiters -= 1
        if flight.waiters == 0 and flight.settled.is_set():
            flight.recycle()
        fetch = flight.fetch
        if fetch is None or flight.finished or fetch.waiters > 0:
            return
        self._orphans.add(fetch)
        if len(self._orphans) > self.config.limits.max_orphan_flights:
            fetch.cancel_scope.cancel()

    def _start_fill(self, meta: ObjectMeta, first: int, reader: object | None) -> Fetch:
        """A fetch for the block at byte ``first`` (registered in the flight table)."""
        fetch = Fetch([])
        idx = first // meta.block_size
        # (a discovery for a peer may find the block in flight for another discovery)
        if meta.size and self._flights.get(FlightKey(meta.key, meta.version, idx)) is None:
            fetch.add(self._new_flight(meta, idx, reader))
        return fetch

    # -- fetch tasks ---------------------------------------------------------------

    async def _run_fetch(self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]) -> None:
        """Fill ``fetch``'s flights from upstream (a task in the engine's nursery)."""
        with fetch.cancel_scope:
            try:
                await self._fetch_with_retries(meta, fetch, via)
            finally:
                self._end_fetch(meta, fetch)

    async def _fetch_with_retries(
        self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]
    ) -> None:
        """Request what ``fetch``'s flights still lack, resuming after failures with
        bounded retries; a failure that remains is handed to every waiter."""
        # complete blocks are committed in tasks of their own: the body keeps coming
        # while the store makes one durable (blocks share its fsyncs), and the upstream
        # connection goes back to its pool without waiting for them; this fetch ends
        # (wait_idle) once they are all stored
        async with trio.open_nursery() as commits:
            await self._fetch_attempts(meta, fetch, via, commits)

    async def _fetch_attempts(
        self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...], commits: trio.Nursery
    ) -> None:
        retries = self.config.limits.upstream_retries
        conditions = Conditions(if_range=meta.strong_etag or meta.last_modified)
        for attempt in range(retries + 1):
            todo = [f for f in fetch.flights if not f.finished]
            if not todo:
                return
            start = todo[0].start + todo[0].filled
            end = todo[-1].start + todo[-1].length - 1
            try:
                async with (
                    self._fetch_slots,
                    self.fetcher.fetch(
                        meta.source,
                        start,
                        end,
                        size=meta.size,
                        conditions=conditions,
                        via=via,
                        block=todo[0].key.index,
                        extra=policy.selecting_fields(meta.key),
                    ) as got,
                ):
                    self.counters.upstream_fetches += 1
                    changed = policy.version_change(meta, got.status, got.headers)
                    if changed is not None:
                        raise VersionChanged(f"{meta.key}: {changed}")
                    if got.status not in (200, 206):
                        raise UpstreamError(
                            f"{meta.key}: upstream answered {got.status} to a block fetch"
                        )
                    await self._fill(meta, fetch, got, commits)
                return
            except VersionChanged as exc:
                log.info("%s changed upstream: dropping version %s", meta.key, meta.version)
                self._forget(meta)
                fetch.fail_unfinished(exc)
                return
            except UpstreamError as exc:
                if attempt == retries:
                    fetch.fail_unfinished(exc)
                    return
                log.info("retrying %s bytes=%d-%d after: %s", meta.source, start, end, exc)
                await trio.sleep(backoff(attempt))

    async def _fill(
        self, meta: ObjectMeta, fetch: Fetch, got: Fetched, commits: trio.Nursery
    ) -> None:
        """Cut ``got``'s body (object bytes ``got.first`` to ``got.stop``, vouched for
        by the fetcher) into ``fetch``'s flights.

        Blocks the body passes that no flight claims are claimed on the way when they
        are neither stored nor in flight (an origin that ignores Range sends them all).
        Complete blocks are committed in tasks started in ``commits``.
        """
        by_index = {f.key.index: f for f in fetch.flights}
        # Blocks of a body not framed by Content-Length (chunked, close-delimited) are
        # stored only once the body has ended cleanly: until then it may yet run long.
        deferred: list[Flight] | None = None if got.can_receive_into else []
        try:
            await self.memory.take(_RECEIVE_BUFFER)
            try:
                await self._receive_body(meta, fetch, got, by_index, deferred, commits)
            finally:
                self.memory.give(_RECEIVE_BUFFER)
            unfinished = [f for f in fetch.flights if not f.finished]
            if unfinished:
                raise UpstreamError(
                    f"{meta.key}: body ended before block {unfinished[0].key.index}"
                )
            # a body without Content-Length ended as promised: now its blocks may be stored
            while deferred:
                commits.start_soon(self._commit, meta, deferred.pop(0))
        except BaseException:
            for flight in deferred or ():  # readers had the bytes; the store does not
                self._retire(flight)
            raise

    async def _receive_body(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        got: Fetched,
        by_index: dict[int, Flight],
        deferred: list[Flight] | None,
        commits: trio.Nursery,
    ) -> None:
        buf = memoryview(bytearray(_RECEIVE_BUFFER)) if got.can_receive_into else None
        pos = got.first
        while True:
            if buf is not None:
                chunk = buf[: await got.receive_into(buf)]
            else:
                chunk = memoryview(await got.receive())
            if not chunk:
                return
            if pos + len(chunk) > meta.size:
                raise UpstreamError(f"{meta.key}: body runs past the object's {meta.size} bytes")
            pos = await self._place(meta, fetch, by_index, chunk, pos, deferred, commits)

    async def _place(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        by_index: dict[int, Flight],
        view: memoryview,
        pos: int,
        deferred: list[Flight] | None,
        commits: trio.Nursery,
    ) -> int:
        """Write a piece of body at object byte ``pos`` into the flights it covers,
        claiming blocks it starts that are neither stored nor in flight; a flight
        completed by it is committed now, in a task in ``commits`` (``deferred`` is
        None), or once the body ended."""
        B = meta.block_size
        while view:
            idx = pos // B
            b_start, b_end = block_bounds(idx, B, meta.size)
            take = min(len(view), b_end - pos)
            flight = by_index.get(idx)
            if flight is None and pos == b_start:
                flight = self._claim_passing(meta, idx, fetch)
                if flight is not None:
                    by_index[idx] = flight
            if flight is not None and not flight.finished:
                have = flight.start + flight.filled
                if pos + take > have:
                    if pos > have:
                        raise UpstreamError(f"{meta.key}: gap in block {idx}")
                    flight.feed(view[have - pos : take])
                    if flight.complete:
                        if deferred is None:
                            commits.start_soon(self._commit, meta, flight)
                        else:
                            deferred.append(flight)
            pos += take
            view = view[take:]
        return pos

    def _claim_passing(self, meta: ObjectMeta, idx: int, fetch: Fetch) -> Flight | None:
        if self._flights.get(FlightKey(meta.key, meta.version, idx)) is not None:
            return None
        if self.store.block_map(meta, idx, idx):
            return None
        flight = self._new_flight(meta, idx, None)
        fetch.add(flight)
        return flight

    async def _commit(self, meta: ObjectMeta, flight: Flight) -> None:
        """Hand a complete block to the store; then it leaves the table."""
        if flight.writer is not None and flight.memory is None:
            await self.store.commit(meta, flight.key.index, flight.writer)
        else:
            await self.store.commit(meta, flight.key.index, bytes(flight.contents()))
        self._retire(flight)

    def _end_fetch(self, meta: ObjectMeta, fetch: Fetch) -> None:
        fetch.fail_unfinished(UpstreamError(f"{meta.key}: fetch abandoned"))
        for f in fetch.flights:
            if not f.complete:
                self._retire(f)
        self._orphans.discard(fetch)

    def _retire(self, flight: Flight) -> None:
        """Take a flight out of the table; close its file if nobody reads it."""
        self._flights.remove(flight)
        if flight.waiters == 0:
            flight.recycle()
