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
import blake3
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

    def __init__(self, key: FlightKey, start: int, length: int) -> None:
        self.key = key
        self.start = start
        self.length = length
        self.buf = bytearray()
        self.error: UpstreamError | None = None
        self.digest: str | None = None
        self.waiters = 0
        self.fetch: Fetch | None = None
        self._hasher = blake3.blake3()
        self._changed = trio.Event()
        self.settled = trio.Event()  # set when it leaves the table (stored or failed)

    @property
    def complete(self) -> bool:
        """True when every byte of the block has arrived."""
        return len(self.buf) >= self.length

    @property
    def finished(self) -> bool:
        """True when no more bytes will arrive (complete or failed)."""
        return self.complete or self.error is not None

    def feed(self, data: bytes | memoryview) -> None:
        """Append bytes that arrived from upstream and wake the readers."""
        if len(self.buf) + len(data) > self.length:
            raise UpstreamError(f"block {self.key.index} got more bytes than it holds")
        self.buf += data
        self._hasher.update(data)
        if self.complete:
            self.digest = str(self._hasher.hexdigest())
        self._wake()

    def fail(self, error: UpstreamError) -> None:
        """Record that no more bytes will come; readers that need them get ``error``."""
        if self.error is None and not self.complete:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        # a trio.Event cannot be cleared: every change gets a fresh one
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, lo: int, hi: int) -> AsyncGenerator[bytes, None]:
        """The block's bytes ``[lo, hi)`` as they arrive.

        Raises:
          UpstreamError: the fetch failed before byte ``hi`` arrived.
        """
        pos = lo
        while pos < hi:
            if len(self.buf) > pos:
                end = min(len(self.buf), hi)
                chunk = bytes(self.buf[pos:end])
                pos = end
                yield chunk
            elif self.error is not None:
                # a fresh exception per reader (one object raised in many tasks would
                # collect their tracebacks), of the same class (VersionChanged stays one)
                raise type(self.error)(str(self.error), status_hint=self.error.status_hint)
            else:
                await self._changed.wait()


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
