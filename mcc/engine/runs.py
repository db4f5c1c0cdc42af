"""Runs: one upstream request for several consecutive blocks of a sequential reader.

Theory of operation: every upstream request costs the same to start, whatever its
length (a slot, a pooled connection, a request and a response head to parse and
vouch for): with 1 MiB blocks, one request per block spent about a fifth of a cold
download's CPU starting requests. So a reader's read-ahead claims its missing blocks
in *runs* of up to :func:`run_blocks` consecutive blocks, each run one
:class:`~mcc.engine.flight.Fetch` whose body is cut into the run's block files as it
arrives, each block committed (and its readers able to finish) when complete, as
for any fetch of several flights (:mod:`mcc.engine.fill`).

The reader's :class:`~mcc.engine.readahead.Window` then counts runs, not blocks: a
depth of ``d`` keeps the run being read plus ``d`` more in flight, so the window
still grows one connection at a time (within ``max_parallel_fetches`` and the per-host
cap) where each connection is limited, and large requests cut the per-request cost
where none is. A run never goes past the reader's range, nor across a block that is
stored or in flight (single flight stays exact: every block is in the table, joined
by every reader that needs it, from the moment its run is claimed).
"""

from __future__ import annotations

from ..store.records import ObjectMeta
from .blocks import block_bounds
from .claimed import Claiming
from .flight import Fetch, Flight, FlightKey

__all__ = ["RUN_BYTES", "Runs", "run_blocks"]

# The most bytes one read-ahead request asks for, and the most blocks: at 20 MB/s
# per connection, 8 MiB take 0.4 s, short enough that a reader's window still adapts
# within seconds; on loopback the request cost is then spread over 8 MiB.
RUN_BYTES = 8 * 1024 * 1024
_RUN_MAX_BLOCKS = 8


def run_blocks(block_size: int) -> int:
    """Blocks per read-ahead request for ``block_size`` (at least 1)."""
    return max(1, min(_RUN_MAX_BLOCKS, RUN_BYTES // block_size))


class Runs(Claiming):
    """Claiming runs of blocks (see the module)."""

    def _new_flight(
        self, meta: ObjectMeta, idx: int, reader: object | None, via: tuple[str, ...] = ()
    ) -> Flight:
        """A flight for block ``idx``, registered in the table (no fetch attached yet;
        one another worker fills is followed from now on: :mod:`mcc.engine.claimed`)."""
        b_start, b_end = block_bounds(idx, meta.block_size, meta.size)
        flight = Flight(
            FlightKey(meta.key, meta.version, idx),
            b_start,
            b_end - b_start,
            self._block_opener(meta, idx),
            self.memory,
        )
        flight.starter = reader
        self._flights.add(flight)
        if self._followed(flight):
            self._follow_soon(meta, flight, via)
        return flight

    def _claim_passing(self, meta: ObjectMeta, idx: int, fetch: Fetch) -> Flight | None:
        """Claim block ``idx`` for ``fetch`` (a body passing it) when it is neither
        stored nor in flight."""
        if self._flights.get(FlightKey(meta.key, meta.version, idx)) is not None:
            return None
        if self.store.block_map(meta, idx, idx):
            return None
        flight = self._new_flight(meta, idx, None)
        if self._followed(flight):
            return None
        fetch.add(flight)
        return flight

    def _claim_following(
        self, meta: ObjectMeta, fetch: Fetch, idx: int, stop: int | None, reader: object | None
    ) -> None:
        """Claim for ``fetch`` (a discovery's, filling block ``idx``) the blocks after
        ``idx`` its body brings, up to byte ``stop``, until one is stored, in flight or
        filled by another worker: they are in the table from now on, so their readers
        join them rather than asking again (single flight); the body passes the rest
        (:meth:`_claim_passing`)."""
        if stop is None:
            return
        last = min(stop, meta.size) - 1
        for j in range(idx + 1, last // meta.block_size + 1):
            if self._flights.get(FlightKey(meta.key, meta.version, j)) is not None:
                return
            if self.store.block_map(meta, j, j):
                return
            flight = self._new_flight(meta, j, reader)
            if self._followed(flight):
                return
            fetch.add(flight)

    def _claim_run(
        self,
        meta: ObjectMeta,
        idx: int,
        last: int,
        run: int,
        stored: dict[int, str],
        claims: dict[int, Flight],
        reader: object | None,
    ) -> Fetch | None:
        """Claim block ``idx`` (neither stored nor in flight) and the blocks after it
        up to ``last`` that are neither either, at most ``run`` in all, for
        one fetch; each claimed flight gets one waiter (the reader) and goes into
        ``claims``. None (nothing claimed) for an object answered whole, whose blocks
        join its body instead (:mod:`mcc.engine.streams`).

        Returns:
          The fetch to start.
        """
        slot = (meta.key, meta.version)
        if slot in self._rangeless or slot in self._streams:
            return None
        stop = min(last, idx + max(1, run) - 1)
        flights: list[Flight] = []
        for j in range(idx, stop + 1):
            if j > idx and (
                j in stored
                or j in claims
                or self._flights.get(FlightKey(meta.key, meta.version, j)) is not None
                or self.store.block_map(meta, j, j)
            ):
                break
            flight = self._new_flight(meta, j, reader)
            flight.waiters += 1
            claims[j] = flight
            if self._followed(flight):
                break  # another worker fills it: the run ends before it
            flights.append(flight)
        return Fetch(flights)
