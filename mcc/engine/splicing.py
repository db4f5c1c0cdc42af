"""Which body bytes may go from the upstream socket straight into a block file.

Theory of operation: a fetch whose body may be spliced (:mod:`mcc.upstream.splice`:
plain HTTP, framed by Content-Length) moves each piece from the socket into the file
of the block it belongs to, at its offset there, with no copy through Python, when
that block is in the fetch's flights, written to a file (not kept in memory), and the
bytes there have not arrived by another fetch of the block (:mod:`mcc.engine.spans`).
Anything else (a block no flight claims yet, bytes another fetch brought, a block
whose file failed) takes the buffered path, :meth:`~mcc.engine.fill.Filling._place`.
The fetch's framing still vouches for every byte: the upstream never moves more than
the span promised, and a body that ends early or runs long fails the fetch.
"""

from __future__ import annotations

from ..errors import UpstreamError
from ..upstream.fetch import Fetched
from ..upstream.splice import FileWriteError, Splicer
from .flight import Flight

__all__ = ["Splicing", "splice_target"]

# Bytes moved per call at most (as one receive into the fill's buffer).
_PIECE = 256 * 1024


def splice_target(
    by_index: dict[int, Flight], pos: int, block_size: int, hi: int | None
) -> tuple[Flight, int] | None:
    """The flight the body's bytes at object offset ``pos`` may be spliced into, and
    how many (up to its next byte that arrived already, the block's end, ``hi``);
    None when they take the buffered path."""
    flight = by_index.get(pos // block_size)
    if flight is None or flight.finished or flight.writer is None or flight.memory is not None:
        return None
    if flight.no_splice:
        return None
    at = pos - flight.start
    if at >= flight.length or flight.coverage.run_end(at) != at:
        return None  # (arrived by the block's other fetch)
    count = flight.coverage.gaps(at, flight.length)[0][1] - at
    if hi is not None:
        count = min(count, hi - pos)
    return (flight, min(count, _PIECE)) if count > 0 else None


class Splicing:
    """One fetch's spliced pieces (its pipe made on first use; :meth:`close` it).

    Args:
      got: the fetch's response.
      block_size: the object's block size.
      hi: the object byte the fetch stops before, if any (see Fetch).
    """

    def __init__(self, got: Fetched, block_size: int, hi: int | None) -> None:
        self.got = got
        self.block_size = block_size
        self.hi = hi
        self._splicer: Splicer | None = None

    def close(self) -> None:
        """Close the pipe, if one was made."""
        if self._splicer is not None:
            self._splicer.close()

    async def piece(self, by_index: dict[int, Flight], pos: int) -> tuple[Flight, int] | None:
        """Splice the body's next bytes (at object offset ``pos``) into the file of
        their flight in ``by_index``, if they may be: returns the flight and how many
        bytes (0: the body ended); None: they take the buffered path.

        Raises:
          UpstreamError: as :meth:`~mcc.upstream.fetch.Fetched.splice_into`, or the
            file could not be written (the bytes are lost: the fetch resumes, and the
            block then takes the buffered path, which keeps it in memory).
        """
        if not self.got.can_splice:
            return None
        target = splice_target(by_index, pos, self.block_size, self.hi)
        if target is None:
            return None
        flight, count = target
        assert flight.writer is not None
        if self._splicer is None:
            self._splicer = Splicer()
        at = pos - flight.start
        try:
            n = await self.got.splice_into(self._splicer, flight.writer.fd, at, count)
        except FileWriteError as exc:
            for f in by_index.values():  # its resume takes the buffered path, which
                f.no_splice = True  # keeps a block whose file fails in memory
            raise UpstreamError(
                f"block {flight.key.index}: its file cannot be written ({exc})"
            ) from None
        if n:
            writer = flight.writer
            writer.length = max(writer.length, at + n)  # (what its commit hashes)
            flight.arrived(at, n)
        return flight, n
