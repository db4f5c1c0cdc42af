"""Whole-object bodies as streams: an origin that ignores Range answers a block fetch
with the whole object (200); blocks that body has not reached yet join it instead of
fetching the object again, and the object is remembered as sent whole (see
:mod:`mcc.engine.fill`)."""

from __future__ import annotations

from ..store.records import ObjectMeta
from ..upstream.fetch import Fetched
from .flight import Fetch, Flight
from .parts import EngineParts, Stream

__all__ = ["MAX_RANGELESS", "Streaming"]

# Objects remembered as sent whole by their origin (a few dozen bytes each).
MAX_RANGELESS = 4096


class Streaming(EngineParts):
    """Registration of whole-object bodies others may join."""

    def _join_stream(self, meta: ObjectMeta, flight: Flight) -> bool:
        """Hand ``flight`` to the whole-object body under way, if it has not passed the
        block's start yet; True when it did."""
        stream = self._streams.get((meta.key, meta.version))
        if stream is None or stream.pos > flight.start or stream.fetch.cancel_scope.cancel_called:
            return False
        if stream.fetch.hi is not None and flight.start >= stream.fetch.hi:
            return False  # a block's head answered whole: it stops at that block
        stream.fetch.add(flight)
        stream.by_index[flight.key.index] = flight
        self._orphans.discard(stream.fetch)
        return True

    def _stream_for(
        self, meta: ObjectMeta, fetch: Fetch, got: Fetched, by_index: dict[int, Flight]
    ) -> Stream | None:
        """Register ``got`` as a whole-object body others may join (a 200), or drop the
        registration a remembered object's fetch made (a 206: Range honoured now).
        Synchronous: readers see it before the first byte is placed."""
        slot = (meta.key, meta.version)
        if got.status != 200:
            self._end_stream(meta, fetch)
            self._rangeless.pop(slot, None)
            return None
        self._rangeless[slot] = None
        self._rangeless.move_to_end(slot)
        while len(self._rangeless) > MAX_RANGELESS:
            self._rangeless.popitem(last=False)
        stream = Stream(fetch, by_index, got.first)
        self._streams[slot] = stream
        return stream

    def _end_stream(self, meta: ObjectMeta, fetch: Fetch) -> None:
        slot = (meta.key, meta.version)
        stream = self._streams.get(slot)
        if stream is not None and stream.fetch is fetch:
            del self._streams[slot]
