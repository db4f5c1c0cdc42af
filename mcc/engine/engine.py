"""The cache engine: read any byte range of any allowed URL, from disk or upstream.

Theory of operation: ``segments(meta, start, end)`` walks the blocks that the range
touches. A stored block is handed out as an open file slice (for ``sendfile``); a
missing block is read from its :class:`~mcc.engine.flight.Flight`, joining the one
in flight or starting one. Ahead of the block being read, up to
``readahead_blocks`` further missing blocks are started, each its own upstream
request, so a cold sequential read keeps several round-trips in flight.

An object's metadata (size, validators, version) is learned by *discovery*: the
first read of an unknown URL fetches the block it needs with a plain range request,
and the response's Content-Range gives the size while its body fills that block.
Concurrent first readers share one discovery. Later block fetches carry ``If-Range``
with the version's validator, so an object that changed upstream answers 200 (or a
different ETag) and becomes a :class:`~mcc.errors.VersionChanged`, never a mix of
old and new bytes.

Every fetch task runs in the engine's nursery. A fetch whose readers all left is an
*orphan*; it keeps going (so the block is stored) unless more than
``max_orphan_flights`` orphans exist, in which case it is cancelled.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import attrs
import trio

from ..config import Config, Drive, structure_config
from ..errors import (
    BadRequest,
    NotCacheable,
    RangeNotSatisfiable,
    Refused,
    UpstreamError,
    VersionChanged,
)
from ..headers import parse_cache_control, parse_content_range, parse_unsatisfied_range
from ..store.blobs import BlobStore, DriveInfo
from ..store.index import Index
from ..store.lock import lock_drives
from ..upstream.client import (
    DEFAULT_PORTS,
    Upstream,
    UpstreamResponse,
    parse_http_url,
    parse_url,
    quote_target,
)
from ..upstream.peers import peer_request
from .blocks import ObjectMeta, block_bounds, block_count, blocks_for_range, make_version
from .flight import Fetch, FileSlice, Flight, FlightKey, FlightTable, MemoryBudget
from .freshness import age, freshness_lifetime, may_serve_stale

__all__ = ["Cache", "FileSlice", "Lookup", "ObjectInfo", "Statistics", "open_cache"]

log = logging.getLogger("mcc.engine")
_V = TypeVar("_V")

# Upstream headers kept with an object and replayed to clients.
_KEPT_HEADERS = frozenset(
    {
        "cache-control",
        "expires",
        "content-disposition",
        "content-language",
        "content-encoding",
        "x-content-type-options",
        "date",  # with "age": inputs of the freshness computation, not replayed
        "age",
    }
)
# Objects whose metadata and fetch URL are mirrored in memory (LRU).
_MEMO_ENTRIES = 65536
# URLs whose cache keys are memoised (cleared whole when full: cheap and bounded).
_RESOLVED_URLS = 65536
# Bytes asked of upstream per receive: one such buffer per fetch is all the memory a
# fill holds (its bytes go to the block file), so a fill's RAM does not depend on the
# block size or on how fast its readers read.
_RECEIVE_BUFFER = 256 * 1024
# Redirects followed in a row before giving up (RFC 9110 s15.4 leaves it to us;
# browsers use about 20; update CDNs use one or two).
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Eviction starts above HIGH_WATER x max_size and stops at LOW_WATER x max_size.
HIGH_WATER = 0.95
LOW_WATER = 0.90
# Blobs evicted per index query.
_EVICT_BATCH = 256
# How often the index's WAL is checkpointed by a worker thread (see store/index.py).
_CHECKPOINT_SECONDS = 2.0
# Seconds before the start that a blob file must be older than to count as an orphan.
_RECONCILE_MARGIN = 2.0
# Retry backoff for block fetches: 0.1 s, 0.2 s, 0.4 s... capped at 2 s.
_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 2.0


@attrs.frozen
class ObjectInfo:
    """What :meth:`Cache.stat` reports about one object."""

    url: str
    key: str
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None
    cached_blocks: int
    total_blocks: int

    @property
    def cached(self) -> bool:
        """True when every block is stored."""
        return self.cached_blocks == self.total_blocks


@attrs.frozen
class Lookup:
    """What :meth:`Cache.lookup` found: the metadata and how it was obtained.

    ``outcome`` is ``fresh`` (stored, within its lifetime), ``miss`` (new to the cache),
    ``revalidated`` (stale, upstream confirmed it), ``changed`` (stale, upstream sent a
    new version) or ``stale`` (stale, upstream failed, served under stale-if-error).
    """

    meta: ObjectMeta
    outcome: str


@attrs.frozen
class Statistics:
    """Counters since the cache was opened."""

    hits: int = 0
    misses: int = 0
    partial_hits: int = 0
    upstream_fetches: int = 0
    flight_joins: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    blocks_stored: int = 0
    store_failures: int = 0
    corrupt_blocks: int = 0
    evictions: int = 0
    stale_served: int = 0
    internal_errors: int = 0


class _Bounded(OrderedDict[str, _V]):
    """A dict that forgets its least recently written entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: _V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.limit:
            self.popitem(last=False)


class _Redirect(Exception):
    """Internal: upstream answered a discovery with a redirect to ``location``."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class _Unsatisfied(Exception):
    """Internal: upstream answered a discovery's range with 416."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


class _Discovery:
    def __init__(self, slot: str, via_peer: bool) -> None:
        self.slot = slot  # its key in the table of discoveries
        self.via_peer = via_peer  # asks the peer owning its block (else parents, origin)
        self.done = trio.Event()
        self.meta: ObjectMeta | None = None
        self.error: Exception | None = None
        self.outcome = "miss"  # or "revalidated" (304) or "changed" (a new version)

    async def wait(self) -> ObjectMeta:
        await self.done.wait()
        if self.meta is not None:
            return self.meta
        assert self.error is not None
        if isinstance(self.error, UpstreamError):
            raise type(self.error)(str(self.error), status_hint=self.error.status_hint)
        if isinstance(self.error, NotCacheable):
            raise NotCacheable(str(self.error))
        raise UpstreamError(f"discovery failed: {self.error}")


class Cache:
    """The cache engine. Make one with :func:`open_cache`.

    Args:
      config: the node's configuration.
      nursery: the nursery that owns every upstream fetch.
      index, blobs, upstream: the parts it ties together.
    """

    def __init__(
        self,
        config: Config,
        nursery: trio.Nursery,
        *,
        index: Index,
        blobs: BlobStore,
        upstream: Upstream,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.policy = config.origin_policy()
        self.index = index
        self.blobs = blobs
        self.upstream = upstream
        self._nursery = nursery
        self._flights = FlightTable()
        self.memory = MemoryBudget(config.limits.max_buffer_memory)
        # memory mirrors of the index, bounded (the index has everything)
        self._metas: _Bounded[ObjectMeta] = _Bounded(_MEMO_ENTRIES)
        self._fetch_urls: _Bounded[str] = _Bounded(_MEMO_ENTRIES)
        self._resolved: dict[str, str] = {}  # allowed URL -> key (hot path memo)
        self._fresh_memo: dict[str, tuple[str, float, float]] = {}
        self._discoveries: dict[str, _Discovery] = {}
        self._orphans: set[Fetch] = set()
        self._verified: set[str] = set()
        self._stats: dict[str, int] = dict.fromkeys(attrs.fields_dict(Statistics), 0)
        self.internal_errors: dict[str, int] = {}  # boundary -> unexpected exceptions
        self._tasks = 0
        self._started = time.time()
        self._pinned: dict[str, int] = {}
        self._evict_wanted = trio.Event()
        # a cap on upstream requests in flight (hostile or bursty clients); more wait
        self._fetch_slots = trio.CapacityLimiter(config.limits.max_upstream_fetches)
        self._reconciled = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Start an engine-owned task, counted for :meth:`wait_idle`."""
        if self._tasks == 0:
            self._idle = trio.Event()
        self._tasks += 1

        async def run() -> None:
            try:
                await fn(*args)
            except Exception:
                # a bug of ours in one fill: its readers got an error (the task's own
                # cleanup failed its flights); the engine and every other fill go on
                self.count_internal_error("engine")
                log.exception("internal error in %s; the requests it served failed", fn.__name__)
            finally:
                self._tasks -= 1
                if self._tasks == 0:
                    self._idle.set()

        self._nursery.start_soon(run)

    async def run_maintenance(self) -> None:
        """Background upkeep, run in the engine's nursery for its whole life: first the
        reconciliation of index and blob files after a (possibly unclean) start, then
        eviction whenever a drive passes its high-water mark, and WAL checkpoints."""
        await self.reconcile()
        self._reconciled.set()
        next_checkpoint = trio.current_time() + _CHECKPOINT_SECONDS
        while True:
            with trio.move_on_at(next_checkpoint):
                await self._evict_wanted.wait()
            self._evict_wanted = trio.Event()
            await self.evict()
            if trio.current_time() >= next_checkpoint:
                try:
                    self.index.flush_touches()
                except OSError as exc:
                    log.debug("could not record access times: %s", exc)
                await trio.to_thread.run_sync(self.index.checkpoint)
                next_checkpoint = trio.current_time() + _CHECKPOINT_SECONDS

    async def wait_reconciled(self) -> None:
        """Wait until the start-up reconciliation (see :meth:`reconcile`) has run."""
        await self._reconciled.wait()

    async def reconcile(self) -> tuple[int, int]:
        """Make the index and the blob files agree after a crash: drop index rows whose
        blob is missing, delete blob files no row names (older than this start, so a
        blob being written now is never taken for an orphan).

        Returns:
          (rows dropped, orphan files deleted).
        """
        indexed = self.index.all_digests()  # before the walk: later rows are not judged
        files = await trio.to_thread.run_sync(lambda: dict(self.blobs.iter_blob_files()))
        dropped = 0
        for digest in indexed:
            if digest not in files and not self.blobs.exists(digest):
                self.index.drop_digest(digest)
                dropped += 1
        # file times are coarser than time.time() (a kernel tick): a margin keeps a
        # blob written just after the start from passing for one written before it
        before = self._started - _RECONCILE_MARGIN
        orphans = [d for d, mtime in files.items() if d not in indexed and mtime < before]
        orphans = [d for d in orphans if not self.index.is_referenced(d)]
        await self._delete_blobs(orphans)
        if dropped or orphans:
            log.info(
                "reconciled the cache: %d index rows without blob dropped, %d orphan blobs deleted",
                dropped,
                len(orphans),
            )
        return dropped, len(orphans)

    async def evict(self) -> int:
        """Bring every drive above its high-water mark (or below its min_free) down to
        the low-water mark, least recently used blobs first; returns blobs evicted.
        Blobs being sent to a client are skipped (and deleting an open file would
        not disturb its reader anyway)."""
        evicted = 0
        for i, drive in enumerate(self.blobs.drives):
            used = self.index.stored_bytes_on(i)
            free = await trio.to_thread.run_sync(self.blobs.free_space, drive)
            target = used
            if used > drive.max_size * HIGH_WATER:
                target = int(drive.max_size * LOW_WATER)
            if free < drive.min_free:
                # free the deficit plus a tenth of the floor, so it does not flap
                target = min(target, used - (drive.min_free - free) - drive.min_free // 10)
            while used > target:
                batch = [
                    (d, size)
                    for d, size in self.index.lru_digests(i, _EVICT_BATCH + len(self._pinned))
                    if d not in self._pinned
                ][:_EVICT_BATCH]
                if not batch:
                    break
                for digest, size in batch:
                    self.index.drop_digest(digest)
                    used -= size
                    evicted += 1
                    if used <= target:
                        batch = batch[: batch.index((digest, size)) + 1]
                        break
                await self._delete_blobs([d for d, _ in batch])
        if evicted:
            self._count("evictions", evicted)
            log.info("evicted %d blobs to stay under max_size/min_free", evicted)
        return evicted

    async def wait_idle(self) -> None:
        """Wait until no upstream fetch is running (every started block is stored or failed)."""
        await self._idle.wait()

    # -- names -------------------------------------------------------------------

    def resolve(self, url: str) -> str:
        """The cache key of ``url``: the normalised URL with the canonical host.

        Raises:
          BadRequest: 400 for a URL that is not http(s)://, 403 for a host not allowed.
        """
        known = self._resolved.get(url)
        if known is not None:
            return known
        try:
            scheme, host, port, target = parse_url(url)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not self.policy.allows(host, port):
            shown = f"[{host}]" if ":" in host else host
            raise BadRequest(f"origin {shown}:{port} is not allowed", status_hint=403)
        canon = self.policy.canonical(host)
        authority = f"[{canon}]" if ":" in canon else canon
        if port != DEFAULT_PORTS[scheme]:
            authority += f":{port}"
        key = f"{scheme}://{authority}{target}"  # http and https objects kept apart
        if key not in self._fetch_urls:
            self._fetch_urls[key] = url
        if len(self._resolved) >= _RESOLVED_URLS:
            self._resolved.clear()
        self._resolved[url] = key
        return key

    # -- public API ----------------------------------------------------------------

    async def meta(self, url: str, *, hint_block: int = 0, via: Sequence[str] = ()) -> ObjectMeta:
        """The metadata of ``url``'s current version (see :meth:`lookup`)."""
        return (await self.lookup(url, hint_block=hint_block, via=via)).meta

    async def lookup(
        self,
        url: str,
        *,
        hint_block: int = 0,
        via: Sequence[str] = (),
        reader: object | None = None,
    ) -> Lookup:
        """The metadata of ``url``'s current version, asking upstream when the object is
        unknown (discovery) or stale (revalidation), and how it was obtained.

        Args:
          url: absolute http URL.
          hint_block: the block a discovery should fetch (the one the caller needs).
          via: the Via entries of the request that asks (sent upstream, so that a
            forwarding loop through other caches is detected).
          reader: any object naming the request, passed to :meth:`segments` too; the
            block a discovery fetches then counts as this reader's own, not a join.

        Raises:
          BadRequest: the URL is not allowed (403) or malformed (400).
          NotCacheable: upstream's answer must not be stored; forward instead.
          UpstreamError: upstream failed (and no stale copy may stand in).
        """
        key = self.resolve(url)
        meta = self._metas.get(key)
        if meta is None:
            meta = self.index.get_object(key)
            if meta is not None:
                self._metas[key] = meta
        now = time.time()
        fresh = self.config.freshness
        rules = self.config.refresh_patterns
        if meta is not None and now < self._fresh_until(meta):
            if self._discoveries:
                await self._wait_peer_discovery(key)
            return Lookup(meta, "fresh")
        disc = self._discoveries.get(key)
        slot = key
        if disc is not None and disc.via_peer and peer_request() is not None:
            # a request from a peer never waits on a discovery that went to a peer
            # (two nodes could wait on each other): it discovers on its own
            slot = f"peer {key}"
            disc = self._discoveries.get(slot)
        if disc is None:
            via_peer = (
                peer_request() is None and self.upstream.peers.owner(url, hint_block) is not None
            )
            disc = _Discovery(slot, via_peer)
            self._discoveries[slot] = disc
            self._spawn(self._discover, url, key, hint_block, disc, tuple(via), meta, reader)
        try:
            found = await disc.wait()
        except UpstreamError:
            if meta is not None and may_serve_stale(
                meta, now, fresh.max_stale, rules, fresh.heuristic_max
            ):
                self._count("stale_served")
                return Lookup(meta, "stale")
            raise
        await self._wait_peer_discovery(key, disc)
        return Lookup(found, disc.outcome)

    async def _wait_peer_discovery(self, key: str, disc: _Discovery | None = None) -> None:
        """Wait while a discovery for a peer (see :meth:`lookup`) is fetching its block
        here: that block is in flight only once it is done, and must not be fetched twice."""
        side = self._discoveries.get(f"peer {key}")
        if side is not None and side is not disc:
            await side.done.wait()

    def _fresh_until(self, meta: ObjectMeta) -> float:
        """When ``meta`` stops being fresh (memoised: parsing dates on every hit costs)."""
        memo = self._fresh_memo.get(meta.key)
        if memo is not None and memo[0] == meta.version and memo[1] == meta.fetched_at:
            return memo[2]
        fresh = self.config.freshness
        lifetime = freshness_lifetime(meta, self.config.refresh_patterns, fresh.heuristic_max)
        until = meta.fetched_at + lifetime - (age(meta, meta.fetched_at))
        if len(self._fresh_memo) >= _RESOLVED_URLS:
            self._fresh_memo.clear()
        self._fresh_memo[meta.key] = (meta.version, meta.fetched_at, until)
        return until

    async def stat(self, url: str) -> ObjectInfo:
        """Size, validators and how much of ``url`` is stored (discovering it if new)."""
        meta = await self.meta(url)
        total = block_count(meta.size, self.block_size)
        stored = self.index.get_blocks(meta.key, meta.version, 0, max(total - 1, 0))
        return ObjectInfo(
            url=url,
            key=meta.key,
            size=meta.size,
            etag=meta.etag,
            last_modified=meta.last_modified,
            content_type=meta.content_type,
            cached_blocks=len(stored),
            total_blocks=total,
        )

    async def read(
        self, url: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The bytes ``start..end`` (inclusive; ``end=None`` means to the last byte).

        Raises:
          RangeNotSatisfiable: ``start`` is beyond the object.
          UpstreamError: upstream failed; no wrong bytes were yielded before it.
        """
        reader = object()
        found = await self.lookup(url, hint_block=start // self.block_size, reader=reader)
        meta = found.meta
        if start >= meta.size and not (start == 0 and meta.size == 0):
            raise RangeNotSatisfiable(meta.size)
        last = meta.size - 1 if end is None else min(end, meta.size - 1)
        async with aclosing(self.segments(meta, start, last, reader=reader)) as segments:
            async for seg in segments:
                if isinstance(seg, FileSlice):
                    yield await trio.to_thread.run_sync(_pread_all, seg)
                else:
                    yield bytes(seg)

    async def warm(self, url: str, progress: Callable[[int], None] | None = None) -> ObjectInfo:
        """Fetch every missing block of ``url`` into the store; returns the new stat.

        ``progress`` is called with the byte count of each piece as it is read.
        """
        meta = await self.meta(url)
        if meta.size:
            async with aclosing(self.segments(meta, 0, meta.size - 1)) as segments:
                async for seg in segments:
                    if progress is not None:
                        progress(seg.length if isinstance(seg, FileSlice) else len(seg))
        for flight in self._flights:  # blocks read from flights: wait until stored
            if flight.key.key == meta.key and flight.key.version == meta.version:
                await flight.settled.wait()
        return await self.stat(url)

    async def purge(self, url: str) -> bool:
        """Forget ``url`` and delete its blobs no other object shares; True if it was stored."""
        key = self.resolve(url)
        known = self.index.get_object(key) is not None
        self._metas.pop(key, None)
        freed = self.index.delete_object(key)
        await self._delete_blobs(freed)
        return known

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config for what comes next (SIGHUP): allowlist, parents,
        freshness rules, limits and timeouts. Fetches in flight keep going. The
        caller keeps ``drives`` and ``block_size`` as they were: they cannot change
        under a running store."""
        self.config = config
        self.policy = config.origin_policy()
        self._resolved.clear()
        self._fresh_memo.clear()
        self._fetch_slots.total_tokens = config.limits.max_upstream_fetches
        self.upstream.reconfigure(config)

    def statistics(self) -> Statistics:
        """A frozen snapshot of the counters."""
        return Statistics(**self._stats)

    # -- reading -------------------------------------------------------------------

    async def segments(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        via: Sequence[str] = (),
        reader: object | None = None,
    ) -> AsyncGenerator[memoryview | FileSlice, None]:
        """The bytes ``start..end`` (inclusive, within the object) as stored-file slices
        and in-memory chunks, in order.

        Raises:
          UpstreamError: a block could not be fetched (VersionChanged when the object
            changed upstream). Bytes yielded before are correct.
        """
        B = self.block_size
        wanted = blocks_for_range(start, end, B)
        if not wanted:
            return
        stored = self.index.get_blocks(meta.key, meta.version, wanted.start, wanted.stop - 1)
        claims: dict[int, Flight] = {}
        from_cache = from_upstream = 0
        joined = False  # waited on a fetch another reader started
        try:
            for idx in wanted:
                joined |= self._claim_ahead(meta, idx, wanted.stop - 1, stored, claims, via, reader)
                b_start, b_end = block_bounds(idx, B, meta.size)
                lo, hi = max(start, b_start) - b_start, min(end + 1, b_end) - b_start
                flight = claims.pop(idx, None)
                if flight is None:
                    digest = stored.get(idx)
                    if digest is None:  # stored by another reader's fetch since we looked
                        digest = self.index.get_blocks(meta.key, meta.version, idx, idx).get(idx)
                    fd = await self._open_verified(digest) if digest is not None else None
                    if fd is not None and digest is not None:
                        with self._pin(digest):
                            try:
                                yield FileSlice(fd, lo, hi - lo)
                            finally:
                                self.blobs.release(digest, fd)
                        from_cache += hi - lo
                        self._count("bytes_from_cache", hi - lo)
                        continue
                    # missing or corrupt on disk (or just evicted): fetch it again
                    stored.pop(idx, None)
                    flight, was_joined = self._claim_missing(meta, idx, via, reader)
                    joined |= was_joined
                try:
                    async with aclosing(flight.read(lo, hi)) as chunks:
                        async for chunk in chunks:
                            n = chunk.length if isinstance(chunk, FileSlice) else len(chunk)
                            self._count("bytes_from_upstream", n)
                            yield chunk
                finally:
                    self._release(flight)
                from_upstream += hi - lo
        finally:
            for flight in claims.values():
                self._release(flight)
            if joined:
                self._count("flight_joins")
            if from_upstream == 0:
                self._count("hits")
            elif from_cache == 0:
                self._count("misses")
            else:
                self._count("partial_hits")
            if stored:
                try:
                    self.index.touch(set(stored.values()))
                except OSError as exc:  # only the LRU order suffers
                    log.debug("could not record access times: %s", exc)

    @contextmanager
    def _pin(self, digest: str) -> Iterator[None]:
        """Keep eviction away from ``digest`` while it is being sent."""
        self._pinned[digest] = self._pinned.get(digest, 0) + 1
        try:
            yield
        finally:
            self._pinned[digest] -= 1
            if not self._pinned[digest]:
                del self._pinned[digest]

    def _claim_ahead(
        self,
        meta: ObjectMeta,
        idx: int,
        last: int,
        stored: dict[int, str],
        claims: dict[int, Flight],
        via: Sequence[str],
        reader: object | None,
    ) -> bool:
        """Make sure blocks ``idx..idx+readahead`` (up to ``last``) are stored or claimed.

        Returns:
          True when a flight another reader started was joined.
        """
        joined = False
        for j in range(idx, min(last, idx + self.config.readahead_blocks) + 1):
            if j in stored or j in claims:
                continue
            if self._flights.get(FlightKey(meta.key, meta.version, j)) is None:
                again = self.index.get_blocks(meta.key, meta.version, j, j)
                if again:  # stored since the caller looked
                    stored.update(again)
                    continue
            claims[j], was_joined = self._claim_missing(meta, j, via, reader)
            joined |= was_joined
        return joined

    def _claim_missing(
        self, meta: ObjectMeta, idx: int, via: Sequence[str], reader: object | None
    ) -> tuple[Flight, bool]:
        """Join block ``idx``'s flight, or start one, without asking the index (whose
        row for it may be stale when the blob turned out missing or corrupt).

        Returns:
          The flight, now with one more waiter, and True when it was joined from
          another reader rather than started here.
        """
        flight = self._flights.get(FlightKey(meta.key, meta.version, idx))
        if flight is None:
            flight = self._new_flight(meta, idx, reader)
            self._spawn(self._run_fetch, meta, Fetch([flight]), tuple(via))
            joined = False
        else:
            if flight.fetch is not None:
                self._orphans.discard(flight.fetch)
            joined = reader is None or flight.starter is not reader
        flight.waiters += 1
        return flight, joined

    def _new_flight(self, meta: ObjectMeta, idx: int, reader: object | None) -> Flight:
        """A flight for block ``idx``, registered in the table (no fetch attached yet)."""
        b_start, b_end = block_bounds(idx, self.block_size, meta.size)
        flight = Flight(
            FlightKey(meta.key, meta.version, idx),
            b_start,
            b_end - b_start,
            self.blobs.writer,
            self.memory,
        )
        flight.starter = reader
        self._flights.add(flight)
        return flight

    def _release(self, flight: Flight) -> None:
        flight.waiters -= 1
        if flight.waiters == 0 and flight.settled.is_set():
            flight.recycle()
        fetch = flight.fetch
        if fetch is None or flight.finished or fetch.waiters > 0:
            return
        self._orphans.add(fetch)
        if len(self._orphans) > self.config.limits.max_orphan_flights:
            fetch.cancel_scope.cancel()

    async def _open_verified(self, digest: str) -> int | None:
        """Open a stored blob, checking it against its name per ``verify_on_read``;
        None when it is missing or corrupt (its rows are dropped, it is refetched)."""
        mode = self.config.verify_on_read
        try:
            fd = self.blobs.acquire(digest)
        except FileNotFoundError:
            # expected when eviction removed it after this read looked it up
            log.info("blob %s is missing from disk: refetching", digest)
            self._drop_digest(digest)
            return None
        if mode == "always" or (mode == "first" and digest not in self._verified):
            ok = await trio.to_thread.run_sync(self.blobs.verify, digest, fd)
            if not ok:
                self.blobs.release(digest, fd)
                self._count("corrupt_blocks")
                log.warning("blob %s does not match its digest: quarantined, refetching", digest)
                self.blobs.quarantine(digest)
                self._drop_digest(digest)
                return None
            self._verified.add(digest)
        return fd

    def _drop_digest(self, digest: str) -> None:
        self._verified.discard(digest)
        try:
            self.index.drop_digest(digest)
        except OSError as exc:  # disk full: the row stays; reads refetch around it
            log.warning("could not drop blob %s from the index: %s", digest, exc)

    # -- upstream --------------------------------------------------------------------

    def _fetch_url(self, key: str) -> str:
        return self._fetch_urls.get(key, key)

    async def _discover(
        self,
        url: str,
        key: str,
        hint: int,
        disc: _Discovery,
        via: tuple[str, ...],
        stale: ObjectMeta | None,
        reader: object | None = None,
    ) -> None:
        """Learn ``key``'s metadata from a range request for block ``hint`` (made
        conditional when a stale copy is stored), and fill that block from its body.
        Failures before the head arrived are retried like block fetches."""
        B = self.block_size
        headers = [("range", f"bytes={hint * B}-{hint * B + B - 1}"), *(("via", v) for v in via)]
        if stale is not None and stale.etag:
            headers.append(("if-none-match", stale.etag))
        elif stale is not None and stale.last_modified:
            headers.append(("if-modified-since", stale.last_modified))
        retries = self.config.limits.upstream_retries
        redirects = 0
        attempt = 0
        try:
            while True:
                try:
                    try:
                        await self._discover_once(url, key, hint, disc, via, stale, headers, reader)
                    except _Unsatisfied as unsatisfied:
                        # the block asked for lies past the end (or the object is
                        # empty): learn the metadata from a HEAD instead
                        meta = await self._discover_by_head(url, key, unsatisfied.size, via)
                        self._adopt(meta)
                        disc.meta = meta
                    return
                except _Redirect as redirect:
                    redirects += 1
                    url = self._follow(url, redirect.location, redirects)
                    self._fetch_urls[key] = url  # block fetches go where it lives
                except UpstreamError as exc:
                    if disc.done.is_set() or attempt == retries or isinstance(exc, Refused):
                        raise
                    log.info("retrying discovery of %s after: %s", url, exc)
                    await trio.sleep(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                    attempt += 1
        except NotCacheable as exc:
            if stale is not None:
                self._forget(stale)  # upstream no longer lets it be stored
            disc.error = exc
        except UpstreamError as exc:
            if not disc.done.is_set():
                disc.error = exc
            else:
                log.info("filling %s failed: %s", url, exc)
        except Exception:
            if not disc.done.is_set():
                disc.error = UpstreamError(f"{url}: internal error in discovery", status_hint=500)
            raise
        finally:
            self._discoveries.pop(disc.slot, None)
            disc.done.set()

    async def _discover_once(
        self,
        url: str,
        key: str,
        hint: int,
        disc: _Discovery,
        via: tuple[str, ...],
        stale: ObjectMeta | None,
        headers: list[tuple[str, str]],
        reader: object | None,
    ) -> None:
        B = self.block_size
        block = hint if disc.via_peer else None
        request = self.upstream.request("GET", url, headers, block=block)
        async with self._fetch_slots, request as resp:
            self._count("upstream_fetches")
            if resp.status == 304 and stale is not None:
                meta = self._refreshed(stale, resp)
                self.index.put_object(meta)
                self._metas[key] = meta
                disc.meta, disc.outcome = meta, "revalidated"
                disc.done.set()
                return
            if resp.status == 416:
                raise _Unsatisfied(parse_unsatisfied_range(resp.header("content-range")))
            location = resp.header("location")
            if resp.status in _REDIRECTS and location:
                raise _Redirect(location)
            if stale is not None and resp.status >= 500:
                # an error, not a verdict on the stored copy: stale-if-error may apply
                raise UpstreamError(f"{url}: upstream answered {resp.status} to revalidation")
            meta, first = self._meta_from(key, resp, hint * B)
            if stale is not None and meta.version == stale.version:
                disc.outcome = "revalidated"  # upstream resent the same version
            elif stale is not None:
                disc.outcome = "changed"
            self._adopt(meta)
            fetch = self._start_fill(meta, first, reader)
            disc.meta = meta
            disc.done.set()
            broken: UpstreamError | None = None
            with fetch.cancel_scope:
                try:
                    stop = min(first + B, meta.size) if resp.status == 206 else meta.size
                    await self._fill(meta, fetch, resp, first, stop)
                except UpstreamError as exc:
                    broken = exc
                except BaseException:
                    self._end_fetch(meta, fetch)
                    raise
        # out of the response (and its upstream slot): resume what the body left undone
        try:
            if broken is not None and not fetch.cancel_scope.cancel_called:
                log.info("resuming %s after: %s", url, broken)
                fetch.cancel_scope = trio.CancelScope()  # a scope is entered only once
                with fetch.cancel_scope:
                    await self._fetch_with_retries(meta, fetch, via)
        finally:
            self._end_fetch(meta, fetch)

    def _follow(self, url: str, location: str, hops: int) -> str:
        """Where a redirect from ``url`` leads, if mcc may follow it.

        Raises:
          NotCacheable: it leads off the allowlist (or off http://): the client gets
            the redirect itself and decides.
          UpstreamError: more than MAX_REDIRECTS in a row (a loop, most likely).
        """
        if hops > MAX_REDIRECTS:
            raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects", status_hint=508)
        target = quote_target(urljoin(url, location.strip()))
        try:
            host, port, _ = parse_http_url(target)
        except ValueError:
            raise NotCacheable(f"redirect to {target[:200]!r} (not http://)") from None
        if not self.policy.allows(host, port):
            raise NotCacheable(f"redirect to {host}:{port}, which is not allowed")
        return target

    def _refreshed(self, stale: ObjectMeta, resp: UpstreamResponse) -> ObjectMeta:
        """``stale`` updated by a 304: new fetch time, the 304's caching headers."""
        updated = {k for k, _ in resp.headers if k in _KEPT_HEADERS}
        headers = tuple((k, v) for k, v in stale.headers if k not in updated) + tuple(
            (k, v) for k, v in resp.headers if k in _KEPT_HEADERS
        )
        return attrs.evolve(stale, headers=headers, fetched_at=time.time())

    async def _discover_by_head(
        self, url: str, key: str, size: int | None, via: tuple[str, ...]
    ) -> ObjectMeta:
        head = [("via", v) for v in via]
        async with self._fetch_slots, self.upstream.request("HEAD", url, head) as resp:
            self._count("upstream_fetches")
            meta, _ = self._meta_from(key, resp, 0)
        if size is not None and size != meta.size:
            raise UpstreamError(f"{url}: HEAD says {meta.size} bytes, a 416 said {size}")
        return meta

    def _meta_from(self, key: str, resp: UpstreamResponse, asked: int) -> tuple[ObjectMeta, int]:
        """Metadata from a discovery response, and the offset its body starts at."""
        if resp.status not in (200, 206):
            raise NotCacheable(f"upstream answered {resp.status}")
        cc = parse_cache_control(resp.header("cache-control"))
        if "no-store" in cc or "private" in cc:
            raise NotCacheable("upstream said no-store or private")
        vary = {v.strip().lower() for v in (resp.header("vary") or "").split(",") if v.strip()}
        if vary - {"accept-encoding"}:
            raise NotCacheable(f"upstream varies on {', '.join(sorted(vary))}")
        first = 0
        if resp.status == 206:
            cr = parse_content_range(resp.header("content-range"))
            asked_end = asked + self.block_size - 1
            if cr is None or cr[2] is None or cr[0] != asked or cr[1] != min(asked_end, cr[2] - 1):
                raise UpstreamError(
                    f"{key}: Content-Range {resp.header('content-range')!r} does not answer "
                    f"a request starting at byte {asked}"
                )
            first, size = cr[0], cr[2]
            _check_length(resp, cr[1] - cr[0] + 1)
        else:
            length = resp.header("content-length")
            if length is None or not length.isdigit():
                raise NotCacheable("upstream sent no Content-Length")
            size = int(length)
        etag, lm = resp.header("etag"), resp.header("last-modified")
        meta = ObjectMeta(
            key=key,
            version=make_version(etag, lm, size),
            size=size,
            etag=etag,
            last_modified=lm,
            content_type=resp.header("content-type"),
            headers=tuple((k, v) for k, v in resp.headers if k in _KEPT_HEADERS),
            fetched_at=time.time(),
        )
        return meta, first

    def _adopt(self, meta: ObjectMeta) -> None:
        self._metas[meta.key] = meta
        try:
            freed = self.index.put_object(meta)
        except OSError as exc:  # disk full: serve from memory, store nothing
            self._count("store_failures")
            log.warning("could not record %s in the index: %s", meta.key, exc)
            return
        self._delete_blobs_now(freed)

    def _forget(self, meta: ObjectMeta) -> None:
        """Drop ``meta``'s version (it changed upstream); the next read rediscovers."""
        current = self.index.get_object(meta.key)
        if current is not None and current.version == meta.version:
            self._delete_blobs_now(self.index.delete_object(meta.key))
        if self._metas.get(meta.key) == meta:
            del self._metas[meta.key]

    def _start_fill(self, meta: ObjectMeta, first: int, reader: object | None) -> Fetch:
        """A fetch for the block at byte ``first`` (registered in the flight table)."""
        fetch = Fetch([])
        idx = first // self.block_size
        # (a discovery for a peer may find the block in flight for another discovery)
        if meta.size and self._flights.get(FlightKey(meta.key, meta.version, idx)) is None:
            fetch.add(self._new_flight(meta, idx, reader))
        return fetch

    async def _run_fetch(self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]) -> None:
        """Fill ``fetch``'s flights from upstream (a task in the engine's nursery)."""
        with fetch.cancel_scope:
            try:
                await self._fetch_with_retries(meta, fetch, via)
            finally:
                self._end_fetch(meta, fetch)

    async def _fetch_with_retries(
        self, meta: ObjectMeta, fetch: Fetch, via: tuple[str, ...]
    ) -> None:
        """Request what ``fetch``'s flights still lack, resuming after failures with
        bounded retries; a failure that remains is handed to every waiter."""
        url = self._fetch_url(meta.key)
        retries = self.config.limits.upstream_retries
        for attempt in range(retries + 1):
            todo = [f for f in fetch.flights if not f.finished]
            if not todo:
                return
            start = todo[0].start + todo[0].filled
            end = todo[-1].start + todo[-1].length - 1
            headers = [("range", f"bytes={start}-{end}"), *(("via", v) for v in via)]
            validator = meta.strong_etag or meta.last_modified
            if validator:
                headers.append(("if-range", validator))
            try:
                request = self.upstream.request("GET", url, headers, block=todo[0].key.index)
                async with self._fetch_slots, request as resp:
                    self._count("upstream_fetches")
                    self._check_block_response(meta, resp, start, end)
                    if resp.status == 206:
                        await self._fill(meta, fetch, resp, start, end + 1)
                    else:
                        await self._fill(meta, fetch, resp, 0, meta.size)
                return
            except VersionChanged as exc:
                log.info("%s changed upstream: dropping version %s", meta.key, meta.version)
                self._forget(meta)
                fetch.fail_unfinished(exc)
                return
            except UpstreamError as exc:
                if attempt == retries:
                    fetch.fail_unfinished(exc)
                    return
                log.info("retrying %s bytes=%d-%d after: %s", url, start, end, exc)
                await trio.sleep(min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))

    def _check_block_response(
        self, meta: ObjectMeta, resp: UpstreamResponse, start: int, end: int
    ) -> None:
        etag, lm = resp.header("etag"), resp.header("last-modified")
        if (meta.etag and etag and etag != meta.etag) or (
            not meta.etag and meta.last_modified and lm and lm != meta.last_modified
        ):
            raise VersionChanged(
                f"{meta.key}: validator changed from {meta.etag or meta.last_modified}"
            )
        if resp.status == 206:
            cr = parse_content_range(resp.header("content-range"))
            if cr != (start, end, meta.size):
                raise UpstreamError(
                    f"{meta.key}: asked bytes {start}-{end}/{meta.size}, "
                    f"got Content-Range {resp.header('content-range')!r}"
                )
            _check_length(resp, end - start + 1)
        elif resp.status == 200:
            length = resp.header("content-length")
            if length is not None and length.isdigit() and int(length) != meta.size:
                raise VersionChanged(f"{meta.key}: length changed from {meta.size} to {length}")
        elif resp.status in (404, 410, 412, 416):
            raise VersionChanged(f"{meta.key}: upstream now answers {resp.status}")
        else:
            raise UpstreamError(f"{meta.key}: upstream answered {resp.status} to a block fetch")

    async def _fill(
        self, meta: ObjectMeta, fetch: Fetch, resp: UpstreamResponse, pos: int, stop: int
    ) -> None:
        """Cut ``resp``'s body, which must be exactly the object's bytes ``pos`` to
        ``stop`` (exclusive), into ``fetch``'s flights.

        Blocks the body passes that no flight claims are claimed on the way when they
        are neither stored nor in flight (an origin that ignores Range sends them all).
        A byte past ``stop`` fails the fetch: it belongs to no block.
        """
        by_index = {f.key.index: f for f in fetch.flights}
        # Blocks of a body not framed by Content-Length (chunked, close-delimited) are
        # stored only once the body has ended cleanly: until then it may yet run long.
        deferred: list[Flight] | None = None if resp.can_receive_into else []
        try:
            await self._fill_body(meta, fetch, resp, pos, stop, by_index, deferred)
        except BaseException:
            for flight in deferred or ():  # readers had the bytes; the store does not
                self._retire(flight)
            raise

    async def _fill_body(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        resp: UpstreamResponse,
        pos: int,
        stop: int,
        by_index: dict[int, Flight],
        deferred: list[Flight] | None,
    ) -> None:
        await self.memory.take(_RECEIVE_BUFFER)
        try:
            await self._receive_body(meta, fetch, resp, pos, stop, by_index, deferred)
        finally:
            self.memory.give(_RECEIVE_BUFFER)
        unfinished = [f for f in fetch.flights if not f.finished]
        if unfinished:
            raise UpstreamError(f"{meta.key}: body ended before block {unfinished[0].key.index}")
        # a body without Content-Length ended as promised: now its blocks may be stored
        while deferred:
            await self._store(meta, deferred.pop(0))

    async def _receive_body(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        resp: UpstreamResponse,
        pos: int,
        stop: int,
        by_index: dict[int, Flight],
        deferred: list[Flight] | None,
    ) -> None:
        buf = memoryview(bytearray(_RECEIVE_BUFFER)) if resp.can_receive_into else None
        while True:
            if buf is not None:
                n = await resp.receive_into(buf)
                chunk = buf[:n]
            else:
                chunk = memoryview(await resp.receive())
            if not chunk:
                break
            if pos + len(chunk) > stop:
                raise UpstreamError(
                    f"{meta.key}: body runs past byte {stop - 1}, the end of what was asked"
                )
            pos = await self._place(meta, fetch, by_index, chunk, pos, deferred)

    async def _place(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        by_index: dict[int, Flight],
        view: memoryview,
        pos: int,
        deferred: list[Flight] | None,
    ) -> int:
        """Write a piece of body at object byte ``pos`` into the flights it covers,
        claiming blocks it starts that are neither stored nor in flight; a flight
        completed by it is stored now (``deferred`` is None) or once the body ended."""
        B = self.block_size
        while view:
            idx = pos // B
            b_start, b_end = block_bounds(idx, B, meta.size)
            take = min(len(view), b_end - pos)
            flight = by_index.get(idx)
            if flight is None and pos == b_start:
                flight = self._claim_passing(meta, idx, fetch)
                if flight is not None:
                    by_index[idx] = flight
            if flight is not None and not flight.finished:
                have = flight.start + flight.filled
                if pos + take > have:
                    if pos > have:
                        raise UpstreamError(f"{meta.key}: gap in block {idx}")
                    flight.feed(view[have - pos : take])
                    if flight.complete:
                        if deferred is None:
                            await self._store(meta, flight)
                        else:
                            deferred.append(flight)
            pos += take
            view = view[take:]
        return pos

    def _claim_passing(self, meta: ObjectMeta, idx: int, fetch: Fetch) -> Flight | None:
        if self._flights.get(FlightKey(meta.key, meta.version, idx)) is not None:
            return None
        if self.index.get_blocks(meta.key, meta.version, idx, idx):
            return None
        flight = self._new_flight(meta, idx, None)
        fetch.add(flight)
        return flight

    async def _store(self, meta: ObjectMeta, flight: Flight) -> None:
        """Write a complete block to the store and index; then it leaves the table."""
        try:
            # hashing (BLAKE3 releases the GIL) and installing run off the trio thread
            if flight.writer is not None and flight.memory is None:
                flight.digest = await trio.to_thread.run_sync(flight.writer.commit)
            else:
                flight.digest = await trio.to_thread.run_sync(self.blobs.put, flight.contents())
            drive = self.blobs.drive_index(flight.digest)
            freed = self.index.add_block(
                meta.key, meta.version, flight.key.index, flight.digest, flight.length, drive
            )
        except OSError as exc:
            self._count("store_failures")
            log.warning("could not store block %d of %s: %s", flight.key.index, meta.key, exc)
            if flight.digest is not None and not self.index.is_referenced(flight.digest):
                await self._delete_blobs([flight.digest])
        else:
            if freed is not None:
                self._count("blocks_stored")
                self._maybe_evict(drive)
                self._verified.add(flight.digest)
                await self._delete_blobs(freed)
            elif not self.index.is_referenced(flight.digest):
                await self._delete_blobs([flight.digest])  # its version is gone already
        self._retire(flight)

    def _end_fetch(self, meta: ObjectMeta, fetch: Fetch) -> None:
        fetch.fail_unfinished(UpstreamError(f"{meta.key}: fetch abandoned"))
        for f in fetch.flights:
            if not f.complete:
                self._retire(f)
        self._orphans.discard(fetch)

    def _maybe_evict(self, drive: int) -> None:
        """Wake the eviction task when ``drive`` passed its high-water mark."""
        d = self.blobs.drives[drive]
        if self.index.stored_bytes_on(drive) > d.max_size * HIGH_WATER:
            self._evict_wanted.set()

    def _retire(self, flight: Flight) -> None:
        """Take a flight out of the table; recycle its buffer if nobody reads it."""
        self._flights.remove(flight)
        if flight.waiters == 0:
            flight.recycle()

    def _forget_blob(self, digest: str) -> None:
        """Drop what the engine keeps about a blob about to be deleted; on the trio
        thread, which owns the fd cache."""
        self.blobs.forget_fd(digest)
        self._verified.discard(digest)

    def _delete_blobs_now(self, digests: list[str]) -> None:
        """Delete blobs on this thread (a few unlinks: a changed or purged object)."""
        for d in digests:
            self._forget_blob(d)
            self.blobs.delete(d)

    async def _delete_blobs(self, digests: list[str]) -> None:
        """Delete blobs in a worker thread (eviction and other batches)."""
        for d in digests:
            self._forget_blob(d)
        if digests:
            await trio.to_thread.run_sync(lambda: [self.blobs.delete(d) for d in digests])

    def count_internal_error(self, where: str) -> None:
        """Count an unexpected exception contained at one of the node's boundaries
        (``engine``, ``http``, ``admin``)."""
        self._count("internal_errors")
        self.internal_errors[where] = self.internal_errors.get(where, 0) + 1

    def _count(self, name: str, n: int = 1) -> None:
        if name in self._stats:
            self._stats[name] += n


def _check_length(resp: UpstreamResponse, span: int) -> None:
    """A 206's Content-Length, when it has one, must be its Content-Range's length."""
    length = resp.header("content-length")
    if length is not None and length.strip() != str(span):
        raise UpstreamError(
            f"{resp.route.name}: Content-Length {length[:20]!r} does not match the "
            f"Content-Range's {span} bytes"
        )


def _pread_all(s: FileSlice) -> bytes:
    out = os.pread(s.fd, s.length, s.offset)
    if len(out) != s.length:
        raise UpstreamError(f"blob is shorter than expected ({len(out)} < {s.length} bytes)")
    return out


def drive_infos(drives: tuple[Drive, ...]) -> list[DriveInfo]:
    """The store's view of the configured drives."""
    return [DriveInfo(Path(d.path), d.max_size, d.min_free) for d in drives]


@asynccontextmanager
async def open_cache(config: Config | None = None, **overrides: Any) -> AsyncIterator[Cache]:
    """Open a cache for use as a library.

    Args:
      config: a full :class:`~mcc.config.Config`; or None for the defaults.
      **overrides: config keys to change (``block_size=``, ``allow_origins=`` ...);
        ``cache_dir=`` is short for one drive at that folder.

    Yields:
      The :class:`Cache`; its fetches stop when the block exits.

    Raises:
      ConfigError: a bad override, one line per problem.
    """
    if overrides or config is None:
        raw: dict[str, Any] = {}
        if config is not None:
            raw = _config_as_raw(config)
        cache_dir = overrides.pop("cache_dir", None)
        if cache_dir is not None:
            raw["drives"] = [{"path": str(cache_dir)}]
        raw.update(overrides)
        config = structure_config(raw)
    # one process per cache directory (raises CacheLocked naming the holder's PID)
    with lock_drives(Path(d.path) for d in config.drives):
        async with _opened(config) as cache:
            yield cache


@asynccontextmanager
async def _opened(config: Config) -> AsyncIterator[Cache]:
    blobs = BlobStore(drive_infos(config.drives))
    swept = blobs.sweep_tmp()
    if swept:
        log.info("removed %d temp files left by an earlier crash", swept)
    index = Index(Path(config.drives[0].path) / "index.sqlite3")
    upstream = Upstream(config)
    try:
        async with trio.open_nursery() as nursery:
            cache = Cache(config, nursery, index=index, blobs=blobs, upstream=upstream)
            nursery.start_soon(cache.run_maintenance)
            nursery.start_soon(upstream.peers.run)
            try:
                yield cache
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
        blobs.close()
        index.close()


def _config_as_raw(config: Config) -> dict[str, Any]:
    import tomllib

    from ..config import config_to_toml

    return dict(tomllib.loads(config_to_toml(config)))
