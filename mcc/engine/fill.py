"""Block fills: which blocks to fetch, who waits on whom, and where bytes go.

Theory of operation: a reader that needs block ``i`` of a record either finds it
stored, joins the :class:`~mcc.engine.flight.Flight` already fetching it, or starts
one (plus further blocks as its read-ahead window says, each its own fetch:
:mod:`mcc.engine.readahead`; every fetch takes a slot of its origin host). A
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

An origin that ignores Range answers a block fetch with the whole object (200): that
body streams once into every block it passes that is neither stored nor in flight,
and readers of blocks it has not reached join it (:mod:`mcc.engine.streams`, which
also remembers such objects, so a later miss costs one whole fetch, not one per block).

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
from ..upstream.progress import Stalled
from .blocks import block_bounds
from .flight import Fetch, Flight, FlightKey
from .parts import Stream
from .readahead import Window, host_of
from .runs import Runs, run_blocks
from .spans import SPLIT_MIN
from .splicing import Splicing

__all__ = ["MAX_ROUTE_MOVES", "Filling"]

log = logging.getLogger("mcc.engine")

# Bytes asked of upstream per receive: one such buffer per fetch is all the memory a
# fill holds (its bytes go to the block file), so a fill's RAM does not depend on the
# block size or on how fast its readers read.
_RECEIVE_BUFFER = 256 * 1024
# Retry backoff for block fetches: 0.1 s, 0.2 s, 0.4 s... capped at 2 s.
_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 2.0
# Stalled routes one fetch may leave behind for the next (peers, parents, the origin).
MAX_ROUTE_MOVES = 8

# The window of one-block reads (most requests): read-ahead off, so never changed.
_ONE_BLOCK = Window(0, 0)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based)."""
    return float(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


class Filling(Runs):
    """The engine's block fills (see the module)."""

    # -- claims: plain synchronous bookkeeping, no await between look and change -----

    def _window(self, blocks: int, block_size: int) -> Window:
        """A read-ahead window for a new reader of ``blocks`` blocks (see
        :mod:`mcc.engine.readahead`); a one-block read shares one that is off."""
        if blocks <= 1:
            return _ONE_BLOCK
        lim = self.config.limits
        per_host = lim.upstream_connections_per_host or lim.max_parallel_fetches  # 0: no cap
        ceiling = min(lim.max_parallel_fetches, per_host) - 1
        now, most = trio.current_time(), run_blocks(block_size)
        return Window(self.config.readahead_blocks, ceiling, now, max_run=most)

    def _claim_ahead(
        self,
        meta: ObjectMeta,
        idx: int,
        last: int,
        stored: dict[int, str],
        claims: dict[int, Flight],
        via: Sequence[str],
        reader: object | None,
        ahead: int,
        first: int | None = None,
        run: int = 1,
    ) -> bool:
        """Make sure blocks ``idx..idx+ahead`` (up to ``last``) are stored or claimed
        (``ahead`` and ``run``: from the reader's :class:`~mcc.engine.readahead.Window`;
        missing blocks are fetched ``run`` at a time; ``first``: the reader's first
        byte, when block ``idx`` holds it).

        Returns:
          True when a flight another reader started was joined.
        """
        joined = False
        for j in range(idx, min(last, idx + ahead) + 1):
            if j in stored or j in claims:
                continue
            if self._flights.get(FlightKey(meta.key, meta.version, j)) is None:
                again = self.store.block_map(meta, j, j)
                if again:  # stored since the caller looked
                    stored.update(again)
                    continue
                fetch = self._claim_run(meta, j, last, run, stored, claims, reader)
                if fetch is not None:  # (mcc.engine.runs)
                    if j == idx and first is not None:
                        self._split(meta, fetch, claims[j], first, tuple(via))
                    self._spawn(self._run_fetch, meta, fetch, tuple(via))
                    continue
            at = first if j == idx else None
            claims[j], was_joined = self._claim_missing(meta, j, via, reader, at)
            joined |= was_joined
        return joined

    def _claim_missing(
        self,
        meta: ObjectMeta,
        idx: int,
        via: Sequence[str],
        reader: object | None,
        first: int | None = None,
    ) -> tuple[Flight, bool]:
        """Join block ``idx``'s flight, or start one, without asking the store (whose
        row for it may be stale when the blob turned out missing or corrupt); one
        started for a reader whose ``first`` byte lies inside it fetches from there,
        its head beside it (:mod:`mcc.engine.spans`).

        Returns:
          The flight, now with one more waiter, and True when it was joined from
          another reader rather than started here.
        """
        flight = self._flights.get(FlightKey(meta.key, meta.version, idx))
        if flight is None:
            flight = self._new_flight(meta, idx, reader, tuple(via))
            joined = self._followed(flight) or self._join_stream(meta, flight)
            if not joined:
                fetch = Fetch([flight])
                slot = (meta.key, meta.version)
                if slot in self._rangeless:  # its answer will be the whole object
                    self._streams[slot] = Stream(fetch, {idx: flight}, 0)
                elif first is not None:
                    self._split(meta, fetch, flight, first, tuple(via))
                self._spawn(self._run_fetch, meta, fetch, tuple(via))
        else:
            if flight.fetch is not None:
                self._orphans.discard(flight.fetch)
            joined = reader is None or flight.starter is not reader
        flight.waiters += 1
        return flight, joined

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

    def _start_fill(
        self, meta: ObjectMeta, first: int, reader: object | None, via: tuple[str, ...] = ()
    ) -> Fetch:
        """A fetch for the block at byte ``first`` (registered in the flight table;
        a ``first`` inside the block: its head is fetched beside it)."""
        fetch = Fetch([])
        idx = first // meta.block_size
        # (a discovery for a peer may find the block in flight for another discovery)
        if meta.size and self._flights.get(FlightKey(meta.key, meta.version, idx)) is None:
            flight = self._new_flight(meta, idx, reader)
            if not self._followed(flight):
                fetch.add(flight)
                self._split(meta, fetch, flight, first, via)
        return fetch

    def _split(
        self, meta: ObjectMeta, fetch: Fetch, flight: Flight, first: int, via: tuple[str, ...]
    ) -> None:
        """Let ``fetch`` fill ``flight``'s block from byte ``first`` on, and start
        another for its head before it (when at least :data:`SPLIT_MIN` bytes)."""
        if first - flight.start < SPLIT_MIN or self._shared() is not None:
            return  # (a shared fill grows from the block's start: mcc.engine.claimed)
        fetch.lo = first
        self._spawn(self._run_fetch, meta, Fetch([flight], hi=first), via)

    # -- fetch tasks ---------------------------------------------------------------

    async def _run_fetch(self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]) -> None:
        """Fill ``fetch``'s flights from upstream (a task in the engine's nursery)."""
        with fetch.cancel_scope:
            try:
                await self._fetch_with_retries(meta, fetch, via)
            finally:
                self._end_fetch(meta, fetch)

    async def _fetch_with_retries(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        via: tuple[str, ...],
        avoid: frozenset[str] = frozenset(),
    ) -> None:
        """Request what ``fetch``'s flights still lack, resuming after failures with
        bounded retries; a failure that remains is handed to every waiter.

        A route that stalled (the progress guard) is not asked again by this fetch:
        it resumes on the next route (no retry spent: moving on is not asking again),
        and fails once none is left. ``avoid`` names routes abandoned before (by the
        discovery that started the fetch)."""
        # complete blocks are committed in tasks of their own: the body keeps coming
        # while the store makes one durable (blocks share its fsyncs), and the upstream
        # connection goes back to its pool without waiting for them; this fetch ends
        # (wait_idle) once they are all stored
        async with trio.open_nursery() as commits:
            await self._fetch_attempts(meta, fetch, via, avoid, commits)

    async def _fetch_attempts(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        via: tuple[str, ...],
        avoid: frozenset[str],
        commits: trio.Nursery,
    ) -> None:
        retries = self.config.limits.upstream_retries
        avoided = set(avoid)
        conditions = Conditions(if_range=meta.strong_etag or meta.last_modified)
        attempt = 0  # failures so far, other than stalled routes left behind
        for _ in range(retries + 1 + MAX_ROUTE_MOVES):
            # (flights that joined a whole-object body come in any order)
            todo = fetch.missing()
            if todo is None:
                return
            start, end = todo
            try:
                async with (
                    self._fetch_slots,
                    self._host_slots.slot(host_of(meta.source)),
                    self.fetcher.fetch(
                        meta.source,
                        start,
                        end,
                        size=meta.size,
                        conditions=conditions,
                        via=via,
                        block=start // meta.block_size,
                        extra=policy.selecting_fields(meta.key),
                        avoid=avoided,
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
            except Stalled as exc:
                if exc.route is None or exc.route in avoided or len(avoided) >= MAX_ROUTE_MOVES:
                    fetch.fail_unfinished(exc)
                    return
                avoided.add(exc.route)
                log.info("%s; resuming %s at byte %d on the next route", exc, meta.source, start)
            except UpstreamError as exc:
                if attempt == retries:
                    fetch.fail_unfinished(exc)
                    return
                log.info("retrying %s bytes=%d-%d after: %s", meta.source, start, end, exc)
                await trio.sleep(backoff(attempt))
                attempt += 1
        fetch.fail_unfinished(UpstreamError(f"{meta.key}: gave up after every route"))

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
        stream = self._stream_for(meta, fetch, got, by_index)
        # Blocks of a body not framed by Content-Length (chunked, close-delimited) are
        # stored only once the body has ended cleanly: until then it may yet run long.
        deferred: list[Flight] | None = None if got.can_receive_into else []
        try:
            await self.memory.take(_RECEIVE_BUFFER)
            splicing = Splicing(got, meta.block_size, fetch.hi)
            try:
                await self._receive_body(
                    meta, fetch, got, by_index, deferred, commits, stream, splicing
                )
            finally:
                splicing.close()
                self.memory.give(_RECEIVE_BUFFER)
                self._end_stream(meta, fetch)
            unfinished = fetch.missing()
            if unfinished is not None:
                raise UpstreamError(f"{meta.key}: body ended before byte {unfinished[0]}")
            # a body without Content-Length ended as promised: now its blocks are
            # vouched for (their readers may finish) and may be stored
            for flight in deferred or ():
                flight.vouch()
            while deferred:
                commits.start_soon(self._commit, meta, deferred.pop(0))
        except BaseException as exc:
            # A body not framed by Content-Length that failed vouches for none of its
            # bytes (garbage inside it shows only as a body running long at its end):
            # the blocks it fed go to neither their readers, nor the store, nor a resume.
            why = exc if isinstance(exc, UpstreamError) else None
            for flight in list(by_index.values()):
                if flight.held:
                    flight.reject(why or UpstreamError(f"{meta.key}: fetch abandoned"))
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
        stream: Stream | None,
        splicing: Splicing,
    ) -> None:
        buf = memoryview(bytearray(_RECEIVE_BUFFER)) if got.can_receive_into else None
        pos = got.first
        while True:
            if (spliced := await splicing.piece(by_index, pos)) is not None:
                flight, n = spliced  # socket to block file, no copy (engine.splicing)
                if not n:
                    return
                pos += n
                if flight.complete:
                    commits.start_soon(self._commit, meta, flight)
                if stream is not None:
                    stream.pos = pos
                continue
            if buf is not None:
                chunk = buf[: await got.receive_into(buf)]
            else:
                chunk = memoryview(await got.receive())
            if not chunk or (fetch.hi is not None and pos >= fetch.hi):
                return  # (a head answered whole stops at its end; the rest goes unread)
            if pos + len(chunk) > meta.size:
                raise UpstreamError(f"{meta.key}: body runs past the object's {meta.size} bytes")
            pos = await self._place(meta, fetch, by_index, chunk, pos, deferred, commits, stream)

    async def _place(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        by_index: dict[int, Flight],
        view: memoryview,
        pos: int,
        deferred: list[Flight] | None,
        commits: trio.Nursery,
        stream: Stream | None = None,
    ) -> int:
        """Write a piece of body at object byte ``pos`` into the flights it covers,
        claiming blocks it starts that are neither stored nor in flight; a flight
        completed by it is committed now, in a task in ``commits`` (``deferred`` is
        None), or once the body ended. ``stream.pos`` follows (before any wait, so a
        block joins only while unpassed)."""
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
            completed = None
            if flight is not None and not flight.finished:
                at = pos - b_start  # bytes another fetch of the block brought are skipped
                gaps = flight.coverage.gaps(at, at + take)
                for a, b in gaps:
                    if deferred is not None:
                        flight.held = True  # readers finish once the body ended cleanly
                    flight.feed(view[a - at : b - at], a)
                if gaps and flight.complete:
                    completed = flight
            pos += take
            view = view[take:]
            if stream is not None:
                stream.pos = pos
            if completed is None:
                continue
            if deferred is None:
                commits.start_soon(self._commit, meta, completed)
            else:
                deferred.append(completed)
        return pos

    async def _commit(self, meta: ObjectMeta, flight: Flight) -> None:
        """Hand a complete block to the store; then it leaves the table."""
        flight.vouch()
        if flight.writer is not None and flight.memory is None:
            await self.store.commit(meta, flight.key.index, flight.writer)
        else:
            await self.store.commit(meta, flight.key.index, bytes(flight.contents()))
        self._retire(flight)

    def _end_fetch(self, meta: ObjectMeta, fetch: Fetch) -> None:
        self._end_stream(meta, fetch)
        abandoned = UpstreamError(f"{meta.key}: fetch abandoned")
        ended = fetch.end()  # (a block's head or tail may still be coming: not those)
        for f in ended:
            f.fail(abandoned)
        for f in ended:
            f.reject(abandoned)  # (a complete block not vouched for by now never will be)
        for f in ended:
            if not f.complete:
                self._retire(f)
        self._orphans.discard(fetch)

    def _retire(self, flight: Flight) -> None:
        """Take a flight out of the table; close its file if nobody reads it."""
        self._flights.remove(flight)
        if flight.waiters == 0:
            flight.recycle()
