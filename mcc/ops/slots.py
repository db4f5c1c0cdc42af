"""Counters shared by worker processes: one slot per worker, summed by the master.

Not wired in yet (issue 17 item 1, ``--workers N``, wants one set of counters for the
node: ``/metrics``, ``/summary`` and ``mcc stats`` reporting node totals from the one
admin endpoint).

Theory of operation: the master makes one anonymous shared mapping before it starts
its workers (``fork`` keeps it shared); it holds ``workers`` slots of one signed
64-bit integer per counter name. Each worker writes only its own slot, so no lock is
needed: a reader sees each counter's old or new value. The master (or any process)
sums the slots. A worker that dies and is restarted gets the same slot back and goes
on from the values there, so totals never go backwards.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence

__all__ = ["MAX_WORKERS", "CounterSlots", "Slot"]

_CELL = struct.Struct("<q")
# a worker count past this is a typo, not a machine (each slot is one page at most)
MAX_WORKERS = 1024


class Slot:
    """The counters of one worker in a :class:`CounterSlots` (its only writer)."""

    def __init__(self, slots: CounterSlots, index: int) -> None:
        self._slots = slots
        self._base = index * len(slots.names) * _CELL.size

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``.

        Raises:
          KeyError: ``name`` is not one of the counters.
        """
        offset = self._base + self._slots.offsets[name]
        mem = self._slots._map
        _CELL.pack_into(mem, offset, _CELL.unpack_from(mem, offset)[0] + n)

    def get(self, name: str) -> int:
        """This worker's value of counter ``name``."""
        value: int = _CELL.unpack_from(self._slots._map, self._base + self._slots.offsets[name])[0]
        return value


class CounterSlots:
    """``workers`` slots of the counters ``names``, in memory shared across ``fork``.

    Args:
      names: the counter names (distinct).
      workers: how many slots (1 to MAX_WORKERS).

    Raises:
      ValueError: no names, a name twice, or a worker count out of range.
    """

    def __init__(self, names: Sequence[str], workers: int) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names: distinct counter names needed, got {list(names)!r}")
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers: 1 to {MAX_WORKERS}, got {workers}")
        self.names = tuple(names)
        self.workers = workers
        self.offsets = {name: i * _CELL.size for i, name in enumerate(self.names)}
        self._map = mmap.mmap(-1, workers * len(self.names) * _CELL.size)  # zero-filled

    def slot(self, index: int) -> Slot:
        """The slot of worker ``index`` (0-based).

        Raises:
          IndexError: no such worker.
        """
        if not 0 <= index < self.workers:
            raise IndexError(f"worker index {index} out of 0..{self.workers - 1}")
        return Slot(self, index)

    def totals(self) -> dict[str, int]:
        """Every counter summed over the workers."""
        width = len(self.names)
        cells = struct.unpack_from(f"<{self.workers * width}q", self._map, 0)
        return {name: sum(cells[i::width]) for i, name in enumerate(self.names)}

    def close(self) -> None:
        """Unmap (in this process)."""
        self._map.close()
