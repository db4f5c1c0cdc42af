"""Single-flight: one upstream fetch per missing block, shared by every reader.

Theory of operation: a :class:`Flight` is one block on its way from upstream. Its
bytes go into the block's file as they arrive; readers (waiters) follow the file, so
a reader that joins late still gets its first byte as soon as the leader does, and a
reader that does not read at all costs disk (page cache), not memory.
A :class:`Fetch` is one upstream request, filling one or more flights in order; it
runs as a task in the engine's own nursery, never in a reader's, so a reader hanging
up cannot fail the others.

The :class:`FlightTable` maps (object key, version, block index) to the flight for
that block. The key names everything the block's bytes depend on, so two different
responses never share a flight. The table is changed only by plain synchronous code
(no ``await`` between looking and changing), so a look-up and a join are atomic with
respect to other tasks.

Lifetime of a flight::

    created (in table) --feed()--> complete --stored+indexed--> removed from table
          \\--fail()--> failed --> removed from table

A block is found either in the index (stored) or in the table (in flight), never in
neither while it is being fetched: the index row is written before the flight leaves
the table.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Callable, Iterator

import attrs
import trio

from ..errors import UpstreamError
from ..store.blobs import BlockWriter
from .spans import Coverage

__all__ = ["Fetch", "FileSlice", "Flight", "FlightKey", "FlightTable", "MemoryBudget"]


@attrs.frozen
class FileSlice:
    """Bytes of a file: ``length`` bytes at ``offset`` of the open file ``fd``.

    The fd is valid until the consumer asks the iterator for its next item.
    """

    fd: int
    offset: int
    length: int


@attrs.frozen
class FlightKey:
    """What a block's bytes depend on: the object, its version, the block index."""

    key: str
    version: str
    index: int


class Flight:
    """One block being fetched, its bytes going straight into its block file.

    Readers get :class:`FileSlice` views of the file (sent with ``sendfile``) for
    the bytes already written, so memory does not grow with slow readers: a fill
    runs at upstream speed into the page cache, and each reader follows at its own.
    When the file cannot be written (a full or failing drive), the flight keeps its
    bytes in memory instead and readers get them from there.

    Args:
      key: the block's identity.
      start: the block's first byte offset within the object.
      length: the block's length in bytes.
      open_writer: makes the block file (raising OSError when it cannot).
    """

    def __init__(
        self,
        key: FlightKey,
        start: int,
        length: int,
        open_writer: Callable[[], BlockWriter],
        budget: MemoryBudget,
    ) -> None:
        self.key = key
        self.start = start
        self.length = length
        self.writer: BlockWriter | None = None
        self.memory: bytearray | None = None  # only when the file could not be written
        self._budget = budget
        try:
            self.writer = open_writer()
        except OSError:
            pass  # kept in memory, if the budget allows (see feed)
        self.recycled = False
        self.coverage = Coverage()  # the bytes that arrived (two fetches: see spans)
        self.filled = 0  # of them, how many from the block's start without a gap
        self.fetches = 0  # fetches filling it now (the last to end settles it)
        self.no_splice = False  # its file failed a splice: bytes come through memory
        self.error: UpstreamError | None = None
        # a body not framed by Content-Length may yet run long (and so have been wrong):
        # its readers finish only once it ended cleanly (vouch) or not (reject)
        self.held = False
        self.digest: str | None = None  # set by the engine once stored
        self.waiters = 0
        self.starter: object | None = None  # the reader whose miss started it
        self.fetch: Fetch | None = None
        self._changed = trio.Event()
        self.settled = trio.Event()  # set when it leaves the table (stored or failed)
        self.born = trio.current_time()  # for the read-ahead's per-connection rate
        self.filled_at: float | None = None  # when its last byte arrived

    @property
    def complete(self) -> bool:
        """True when every byte of the block has arrived."""
        return self.filled >= self.length

    @property
    def finished(self) -> bool:
        """True when no more bytes will arrive (complete or failed)."""
        return self.complete or self.error is not None

    def feed(self, data: bytes | memoryview, at: int | None = None) -> None:
        """Write bytes that arrived from upstream at block offset ``at`` (default: the
        end of the gapless prefix) and wake the readers."""
        at = self.filled if at is None else at
        end = at + len(data)
        if end > self.length:
            raise UpstreamError(f"block {self.key.index} got more bytes than it holds")
        if self.memory is None:
            try:
                if self.writer is None:
                    raise OSError("no block file")
                self.writer.write(data, at)
            except OSError as exc:
                # the drive is full or failing: keep this block in memory (what was
                # written stays readable through the open fd until recycle)
                self._to_memory(exc)
        if self.memory is not None:
            self.memory[at:end] = data
        self.arrived(at, len(data))

    def arrived(self, at: int, n: int) -> None:
        """``n`` bytes at block offset ``at`` are in the block file (written there
        by :meth:`feed`, or spliced into it): wake the readers."""
        self.coverage.add(at, at + n)
        self.filled = self.coverage.prefix
        if self.filled >= self.length:
            self.filled_at = trio.current_time()
        self._wake()

    def advance(self, filled: int, writer: BlockWriter | None = None) -> None:
        """Bytes written by another process are readable up to ``filled`` (which
        goes back to 0 when the fill starts over on a new file, ``writer``): wake
        the readers."""
        if writer is not None:
            self.writer = writer
            self.coverage = Coverage()  # a new file: nothing in it yet
        if filled:
            self.coverage.add(0, filled)
        self.filled = self.coverage.prefix
        if self.filled >= self.length and self.filled_at is None:
            self.filled_at = trio.current_time()
        self._wake()

    def _to_memory(self, why: OSError) -> None:
        if not self._budget.try_take(self.length):
            raise UpstreamError(
                f"block {self.key.index}: its file cannot be written ({why}) and the "
                "memory budget is spent"
            )
        self.memory = bytearray(self.length)
        writer = self.writer
        if writer is not None:
            for a, b in self.coverage.runs:
                self.memory[a:b] = os.pread(writer.fd, b - a, a)

    def contents(self) -> bytes | bytearray:
        """The block's bytes, for storing a block kept in memory."""
        assert self.memory is not None
        return self.memory

    def recycle(self) -> None:
        """Close the block file (removed unless it was stored); only once nobody can
        read it any more (out of the table, no waiter)."""
        if self.recycled:
            return
        self.recycled = True
        if self.writer is not None:
            self.writer.close()
        if self.memory is not None:
            self._budget.give(self.length)
        self.memory = None

    def fail(self, error: UpstreamError) -> None:
        """Record that no more bytes will come; readers that need them get ``error``."""
        if self.error is None and not self.complete:
            self.error = error
            self._wake()

    def vouch(self) -> None:
        """The body that brought this block ended as promised: readers may finish."""
        if self.held:
            self.held = False
            self._wake()

    def reject(self, error: UpstreamError) -> None:
        """The body that brought this block's bytes (not framed by Content-Length)
        failed, so none of them is vouched for: a reader not finished yet gets
        ``error`` instead of its last bytes, and no fetch resumes from them."""
        if self.held and self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        # a trio.Event cannot be cleared: every change gets a fresh one
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, lo: int, hi: int) -> AsyncGenerator[FileSlice | memoryview, None]:
        """The block's bytes ``[lo, hi)`` as they arrive: slices of the block file
        (valid until the next item is asked for), or copies kept in memory.

        Raises:
          UpstreamError: the fetch failed before byte ``hi`` arrived.
        """
        pos = lo
        while pos < hi:
            have = self.coverage.run_end(pos)  # arrived from pos on, without a gap
            if have >= hi and self.held and self.error is None:
                await self._changed.wait()  # the last piece waits for the body's end
            elif have > pos and (have < hi or not self.held):
                end = min(have, hi)
                if self.memory is not None:
                    chunk: FileSlice | memoryview = memoryview(bytes(self.memory[pos:end]))
                else:
                    assert self.writer is not None
                    chunk = FileSlice(self.writer.fd, pos, end - pos)
                pos = end
                yield chunk
            elif self.error is not None:
                # a fresh exception per reader (one object raised in many tasks would
                # collect their tracebacks), of the same class (VersionChanged stays one)
                raise type(self.error)(str(self.error), status_hint=self.error.status_hint)
            else:
                await self._changed.wait()


class MemoryBudget:
    """The bytes of RAM that fills may hold at once (``limits.max_buffer_memory``):
    each fetch's receive buffer, and blocks kept in memory because their drive could
    not take them. Synchronous bookkeeping plus a wait for room."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if they fit; True when taken."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    async def take(self, n: int) -> None:
        """Take ``n`` bytes, waiting until they fit."""
        while not self.try_take(n):
            await self._freed.wait()

    def give(self, n: int) -> None:
        """Give back ``n`` bytes taken before."""
        self.used -= n
        self._freed.set()
        self._freed = trio.Event()


class Fetch:
    """One upstream request filling consecutive flights; owns its cancel scope.

    Args:
      flights: the flights it fills, in order.
      lo: the object byte it starts at when not its first flight's start (the tail
        of a block, from a reader's first byte: see :mod:`mcc.engine.spans`).
      hi: the object byte it stops before, when not its last flight's end (the head
        of such a block); a fetch with ``hi`` is not its flights' ``fetch``.
    """

    def __init__(self, flights: list[Flight], lo: int | None = None, hi: int | None = None) -> None:
        self.flights: list[Flight] = []
        self.lo = lo
        self.hi = hi
        self.ended = False
        for f in flights:
            self.add(f)
        self.cancel_scope = trio.CancelScope()

    def add(self, flight: Flight) -> None:
        """Take on another flight (an origin that ignores Range sends the rest too)."""
        if self.hi is None or flight.fetch is None:
            flight.fetch = self
        flight.fetches += 1
        self.flights.append(flight)

    def missing(self) -> tuple[int, int] | None:
        """The object bytes ``(start, end)`` (inclusive) this fetch still has to ask
        for: from the first byte of its span not yet arrived to the end of its span;
        None when there is none."""
        todo = sorted((f for f in self.flights if not f.finished), key=lambda f: f.start)
        start = None
        for f in todo:
            at = max(self.lo or 0, f.start) - f.start
            if at < f.length and (gap := f.coverage.run_end(at)) < f.length:
                start = f.start + gap
                break
        if start is None:
            return None
        stop = todo[-1].start + todo[-1].length
        if self.hi is not None:
            stop = min(stop, self.hi)
        return (start, stop - 1) if start < stop else None

    def end(self) -> list[Flight]:
        """This fetch is over (once only): the flights no other fetch fills now."""
        if self.ended:
            return []
        self.ended = True
        for f in self.flights:
            f.fetches -= 1
        return [f for f in self.flights if f.fetches <= 0]

    @property
    def waiters(self) -> int:
        """Readers currently waiting on any of this fetch's flights."""
        return sum(f.waiters for f in self.flights if not f.finished)

    def fail_unfinished(self, error: UpstreamError) -> None:
        """Fail every flight that has not received all its bytes."""
        for f in self.flights:
            f.fail(error)


class FlightTable:
    """The blocks in flight, by :class:`FlightKey`. Synchronous bookkeeping only."""

    def __init__(self) -> None:
        self._flights: dict[FlightKey, Flight] = {}

    def get(self, key: FlightKey) -> Flight | None:
        """The flight for ``key``, or None."""
        return self._flights.get(key)

    def add(self, flight: Flight) -> None:
        """Register a new flight.

        Raises:
          KeyError: a flight for that key is already registered.
        """
        if flight.key in self._flights:
            raise KeyError(f"a flight for {flight.key} is already registered")
        self._flights[flight.key] = flight

    def remove(self, flight: Flight) -> None:
        """Unregister ``flight`` (no-op when another flight now holds its key)."""
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.settled.set()

    def __len__(self) -> int:
        return len(self._flights)

    def __iter__(self) -> Iterator[Flight]:
        return iter(list(self._flights.values()))
