"""The state the engine's rooms share: the store, the fetcher, the flight table, the
record memo, the counters, and the task spawner that owns every fetch.

:class:`~mcc.engine.fill.Filling` (block fetches), :class:`~mcc.engine.discovery.
Discovering` (learning and revalidating records) and :class:`~mcc.engine.engine.Cache`
(the public API) each add their part on top of :class:`EngineParts`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..config import Config
from ..store.records import ObjectMeta
from ..store.store import Store
from ..upstream.client import Upstream
from ..upstream.fetch import Fetcher
from .flight import Fetch, Flight, FlightTable, MemoryBudget
from .readahead import HostSlots
from .scrub import Scrub

__all__ = ["EngineCounters", "EngineParts", "RecordMemo", "Stream"]

log = logging.getLogger("mcc.engine")

# Bytes of records kept in memory (keys, URLs and header fields counted).
_MEMO_BYTES = 64 * 1024 * 1024


@attrs.define
class EngineCounters:
    """What the engine counts since it started (typed: a typo is a type error)."""

    hits: int = 0
    misses: int = 0
    partial_hits: int = 0
    upstream_fetches: int = 0
    flight_joins: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    stale_served: int = 0
    internal_errors: int = 0


@attrs.define
class Stream:
    """A body bringing the whole object (an origin that ignores Range): a block it has
    not reached yet joins it instead of fetching the object once more.

    Attributes:
      fetch: the fetch reading the body.
      by_index: its flights by block index (the dict the fill places bytes with).
      pos: the object offset of the next byte it will place.
    """

    fetch: Fetch
    by_index: dict[int, Flight]
    pos: int


class RecordMemo:
    """Records by key in memory, least recently used dropped beyond a byte budget
    (a record's size is its key, URL and header fields: unique long URLs cannot grow
    it past the budget)."""

    def __init__(self, limit: int = _MEMO_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._items: OrderedDict[str, tuple[ObjectMeta, int]] = OrderedDict()

    @staticmethod
    def _weight(meta: ObjectMeta) -> int:
        fields = sum(len(k) + len(v) for k, v in meta.headers)
        return 200 + 2 * len(meta.key) + len(meta.fetch_url or "") + fields

    def get(self, key: str) -> ObjectMeta | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, meta: ObjectMeta) -> None:
        self.pop(meta.key)
        weight = self._weight(meta)
        self._items[meta.key] = (meta, weight)
        self.used += weight
        while self.used > self.limit and self._items:
            _, (_, w) = self._items.popitem(last=False)
            self.used -= w

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.used -= item[1]

    def __len__(self) -> int:
        return len(self._items)


class EngineParts:
    """Shared state of one engine (see the module)."""

    def __init__(
        self, config: Config, nursery: trio.Nursery, *, store: Store, upstream: Upstream
    ) -> None:
        self.config = config
        self.policy = config.origin_policy()
        self.store = store
        self.upstream = upstream
        self.fetcher = Fetcher(upstream)
        self.memory = MemoryBudget(config.limits.max_buffer_memory)
        self.counters = EngineCounters()
        self.internal_errors: dict[str, int] = {}  # boundary -> unexpected exceptions
        self._nursery = nursery
        self._flights = FlightTable()
        self._metas = RecordMemo()
        self._orphans: set[Fetch] = set()
        # whole-object bodies under way (an origin that ignores Range), and the objects
        # known to be sent whole (see mcc.engine.fill)
        self._streams: dict[tuple[str, str], Stream] = {}
        self._rangeless: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.scrub: Scrub | None = None  # the background scrub, once the engine runs
        # a cap on upstream requests in flight (hostile or bursty clients); more wait
        self._fetch_slots = trio.CapacityLimiter(config.limits.max_upstream_fetches)
        # ... and a cap per origin host (block fetches and discoveries)
        self._host_slots = HostSlots(config.limits.upstream_connections_per_host)
        self._tasks = 0
        self._idle = trio.Event()
        self._idle.set()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start an engine-owned task, counted for ``wait_idle``. A bug in it fails
        only the requests it serves (its own cleanup fails its flights): it is
        logged and counted, and the engine and every other task go on."""
        if self._tasks == 0:
            self._idle = trio.Event()
        self._tasks += 1

        async def run() -> None:
            try:
                await fn(*args)
            except Exception:
                self.count_internal_error("engine")
                log.exception("internal error in %s; the requests it served failed", fn.__name__)
            finally:
                self._tasks -= 1
                if self._tasks == 0:
                    self._idle.set()

        self._nursery.start_soon(run)

    def count_internal_error(self, where: str) -> None:
        """Count an unexpected exception contained at one of the node's boundaries
        (``engine``, ``http``, ``admin``)."""
        self.counters.internal_errors += 1
        self.internal_errors[where] = self.internal_errors.get(where, 0) + 1

    def _adopt(self, meta: ObjectMeta) -> None:
        """Serve ``meta`` from now on, and file it (a full disk: memory only)."""
        self._metas.put(meta)
        self.store.put_object(meta)

    def _forget(self, meta: ObjectMeta) -> None:
        """Drop ``meta``'s version (it changed upstream); the next read rediscovers."""
        self.store.forget_version(meta)
        if self._metas.get(meta.key) == meta:
            self._metas.pop(meta.key)
