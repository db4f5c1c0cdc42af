"""Single-flight: one upstream fetch per missing block, shared by every reader.

Theory of operation: a :class:`Flight` is one block on its way from upstream. Its
bytes accumulate in a buffer; readers (waiters) copy from the buffer as bytes arrive,
so a reader that joins late still gets its first byte as soon as the leader does.
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

from collections.abc import AsyncGenerator, Iterator

import attrs
import trio

from ..errors import UpstreamError

__all__ = ["Fetch", "Flight", "FlightKey", "FlightTable"]


@attrs.frozen
class FlightKey:
    """What a block's bytes depend on: the object, its version, the block index."""

    key: str
    version: str
    index: int


class Flight:
    """One block being fetched.

    Args:
      key: the block's identity.
      start: the block's first byte offset within the object.
      length: the block's length in bytes.
    """

    def __init__(
        self, key: FlightKey, start: int, length: int, pool: BufferPool | None = None
    ) -> None:
        self.key = key
        self.start = start
        self.length = length
        # Preallocated and never resized, so readers can hold memoryviews of the part
        # already filled (zero-copy) while more bytes arrive behind it. Taken from a
        # pool: fresh memory costs a page fault per 4 KiB on first touch, which was
        # the largest single cost of a cold download.
        self._pool = pool
        self.buf = pool.take(length) if pool is not None else bytearray(length)
        self.view = memoryview(self.buf)[:length]
        self.recycled = False
        self.filled = 0
        self.error: UpstreamError | None = None
        self.digest: str | None = None  # set by the engine once stored
        self.waiters = 0
        self.starter: object | None = None  # the reader whose miss started it
        self.fetch: Fetch | None = None
        self._changed = trio.Event()
        self.settled = trio.Event()  # set when it leaves the table (stored or failed)

    @property
    def complete(self) -> bool:
        """True when every byte of the block has arrived."""
        return self.filled >= self.length

    @property
    def finished(self) -> bool:
        """True when no more bytes will arrive (complete or failed)."""
        return self.complete or self.error is not None

    def feed(self, data: bytes | memoryview) -> None:
        """Append bytes that arrived from upstream and wake the readers."""
        end = self.filled + len(data)
        if end > self.length:
            raise UpstreamError(f"block {self.key.index} got more bytes than it holds")
        self.view[self.filled : end] = data
        self.filled = end
        self._wake()

    def filled_by(self, n: int) -> None:
        """Record ``n`` bytes written straight into ``view`` past ``filled``."""
        if self.filled + n > self.length:
            raise UpstreamError(f"block {self.key.index} got more bytes than it holds")
        self.filled += n
        self._wake()

    def recycle(self) -> None:
        """Give the buffer back to the pool; only once nobody can read it any more
        (out of the table, no waiter). Views still held elsewhere keep it out of
        reuse (see :meth:`BufferPool.take`)."""
        if self.recycled:
            return
        self.recycled = True
        self.view.release()
        if self._pool is not None:
            self._pool.give(self.buf)

    def fail(self, error: UpstreamError) -> None:
        """Record that no more bytes will come; readers that need them get ``error``."""
        if self.error is None and not self.complete:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        # a trio.Event cannot be cleared: every change gets a fresh one
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, lo: int, hi: int) -> AsyncGenerator[memoryview, None]:
        """The block's bytes ``[lo, hi)`` as they arrive (views into the buffer).

        Raises:
          UpstreamError: the fetch failed before byte ``hi`` arrived.
        """
        pos = lo
        while pos < hi:
            if self.filled > pos:
                end = min(self.filled, hi)
                chunk = self.view[pos:end]
                pos = end
                yield chunk
            elif self.error is not None:
                # a fresh exception per reader (one object raised in many tasks would
                # collect their tracebacks), of the same class (VersionChanged stays one)
                raise type(self.error)(str(self.error), status_hint=self.error.status_hint)
            else:
                await self._changed.wait()


class BufferPool:
    """Block buffers for reuse, so their pages are already mapped.

    A buffer handed back may still be exported (a memoryview of it being sent to a
    client); :meth:`take` only reuses a buffer that nothing views any more, which it
    tests by resizing it (a bytearray refuses to resize while exported).

    Args:
      size: the block size (every pooled buffer has this length).
      keep: how many idle buffers to keep at most.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._idle: list[bytearray] = []

    def take(self, length: int) -> bytearray:
        """A buffer of at least ``length`` bytes (content undefined)."""
        if length <= self.size:
            for i in range(len(self._idle) - 1, -1, -1):
                buf = self._idle[i]
                try:
                    buf.append(0)  # raises BufferError while any view exists
                    buf.pop()
                except BufferError:
                    continue
                del self._idle[i]
                return buf
            return bytearray(self.size)
        return bytearray(length)

    def give(self, buf: bytearray) -> None:
        """Hand a buffer back (dropped when the pool is full or it has another size)."""
        if len(buf) == self.size and len(self._idle) < self.keep:
            self._idle.append(buf)


class Fetch:
    """One upstream request filling consecutive flights; owns its cancel scope."""

    def __init__(self, flights: list[Flight]) -> None:
        self.flights = flights
        for f in flights:
            f.fetch = self
        self.cancel_scope = trio.CancelScope()

    def add(self, flight: Flight) -> None:
        """Take on another flight (an origin that ignores Range sends the rest too)."""
        flight.fetch = self
        self.flights.append(flight)

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
