"""Which bytes of a block have arrived, when more than one fetch fills it.

Theory of operation: a cold range that starts inside a block must not wait for the
block's earlier bytes. Its block is then filled by two fetches side by side (see
:mod:`mcc.engine.fill`): the *tail* from the reader's first byte to the block's end
(asked first: it carries the reader's first byte), and the *head*, from the block's
start up to that byte. Each writes into the same block file at its own offsets, each
vouched for by its own framing (:mod:`mcc.upstream.fetch`); readers follow the file
from their own offset, as far as the bytes there have arrived. The block is complete
(and committed, its digest computed over the whole file) once every byte arrived.

:class:`Coverage` keeps the byte intervals of one block that arrived: sorted,
disjoint and merged, so a block filled in order is one interval from 0 (its
``prefix``), and one filled from two ends is at most two. Plain synchronous
arithmetic (sans-I/O), tested against a set-of-bytes model.
"""

from __future__ import annotations

__all__ = ["SPLIT_MIN", "Coverage"]

# A head shorter than this is fetched in order with the rest of its block rather
# than by a request of its own: at 20 MB/s per connection 16 KiB takes under a
# millisecond, less than the round trip another request costs.
SPLIT_MIN = 16 * 1024


class Coverage:
    """The byte intervals ``[a, b)`` of one block that have arrived."""

    def __init__(self) -> None:
        self._runs: list[tuple[int, int]] = []  # sorted, disjoint, not touching

    @property
    def runs(self) -> list[tuple[int, int]]:
        """The intervals, in order (a copy)."""
        return list(self._runs)

    @property
    def prefix(self) -> int:
        """How many bytes from 0 on have arrived without a gap."""
        runs = self._runs
        return runs[0][1] if runs and runs[0][0] == 0 else 0

    def add(self, lo: int, hi: int) -> None:
        """Bytes ``[lo, hi)`` arrived (overlapping what arrived before is allowed)."""
        if lo >= hi:
            return
        kept: list[tuple[int, int]] = []
        for a, b in self._runs:
            if b < lo or a > hi:  # apart (touching runs merge)
                kept.append((a, b))
            else:
                lo, hi = min(lo, a), max(hi, b)
        kept.append((lo, hi))
        kept.sort()
        self._runs = kept

    def run_end(self, pos: int) -> int:
        """The end of the arrived run holding byte ``pos``; ``pos`` when it has not
        arrived (so ``run_end(pos) - pos`` bytes may be read from ``pos``, and the
        result is also the first byte at or after ``pos`` still missing)."""
        for a, b in self._runs:
            if a <= pos < b:
                return b
        return pos

    def gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The intervals of ``[lo, hi)`` that have not arrived, in order."""
        out: list[tuple[int, int]] = []
        pos = lo
        for a, b in self._runs:
            if b <= pos:
                continue
            if a >= hi:
                break
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
            if pos >= hi:
                break
        if pos < hi:
            out.append((pos, hi))
        return out
