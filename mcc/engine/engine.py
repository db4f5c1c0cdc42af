"""The cache engine: read any byte range of any allowed URL, from disk or upstream.

Theory of operation: the engine only plans. :meth:`Cache.lookup` finds an object's
record (in memory, in the store, or by discovery: :mod:`mcc.engine.discovery`);
:meth:`Cache.segments` walks the blocks a range touches: a stored block is handed out
as an open file slice (for ``sendfile``), a missing one is read from its flight,
joined or started (:mod:`mcc.engine.fill`), with read-ahead. Bytes on disk belong to
:class:`~mcc.store.store.Store`; bytes from upstream are vouched for by
:class:`~mcc.upstream.fetch.Fetcher`; what may be stored and for how long is
:mod:`mcc.policy`. Block arithmetic uses each record's own block size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing

import attrs
import trio

from ..config import Config
from ..errors import BadRequest, NotCacheable, RangeNotSatisfiable, UpstreamError
from ..policy import age, freshness_lifetime, may_serve_stale
from ..policy import object_key as policy_object_key
from ..store.blobs import BlobStore
from ..store.index import Index
from ..store.records import ObjectMeta
from ..store.store import Store
from ..upstream.client import DEFAULT_PORTS, Upstream, parse_url
from .blocks import block_bounds, block_count, blocks_for_range
from .discovery import Discovering
from .flight import FileSlice, Flight
from .variants import Varies

__all__ = ["Cache", "FileSlice", "Lookup", "ObjectInfo", "Statistics"]

log = logging.getLogger("mcc.engine")

# URLs whose cache keys (and records' freshness) are memoised (cleared whole when full).
_RESOLVED_URLS = 65536


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
    """What :meth:`Cache.lookup` found: the record and how it was obtained.

    ``outcome`` is ``fresh`` (stored, within its lifetime), ``miss`` (new to the cache),
    ``revalidated`` (stale, upstream confirmed it), ``changed`` (stale, upstream sent a
    new version) or ``stale`` (stale, upstream failed, served under stale-if-error).
    """

    meta: ObjectMeta
    outcome: str
    upstream_status: int = 0  # the status of upstream's answer, when it was asked


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


class Cache(Discovering):
    """The cache engine. Make one with :func:`mcc.engine.opening.open_cache`.

    Args:
      config: the node's configuration.
      nursery: the nursery that owns every upstream fetch.
      store, upstream: the parts it ties together.
    """

    def __init__(
        self, config: Config, nursery: trio.Nursery, *, store: Store, upstream: Upstream
    ) -> None:
        super().__init__(config, nursery, store=store, upstream=upstream)
        self._init_discovery()
        self._resolved: dict[str, str] = {}  # allowed URL -> key (hot path memo)
        self._fresh_memo: dict[str, tuple[str, float, float]] = {}

    # views for monitoring (read-only by convention: the store owns them)
    @property
    def block_size(self) -> int:
        """The block size new objects are cut at."""
        return self.store.block_size

    @property
    def index(self) -> Index:
        return self.store.index

    @property
    def blobs(self) -> BlobStore:
        return self.store.blobs

    async def wait_idle(self) -> None:
        """Wait until no upstream fetch is running (every started block is stored or failed)."""
        await self._idle.wait()

    async def evict(self) -> int:
        """Run eviction now (see :meth:`Store.evict`); returns blobs evicted."""
        return await self.store.evict()

    async def wait_reconciled(self) -> None:
        """Wait until the start-up reconciliation has run."""
        await self.store.wait_reconciled()

    async def reconcile(self) -> tuple[int, int]:
        """Reconcile index and blob files now (see :meth:`Store.reconcile`)."""
        return await self.store.reconcile()

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
        if len(self._resolved) >= _RESOLVED_URLS:
            self._resolved.clear()
        self._resolved[url] = key
        return key

    # -- public API ----------------------------------------------------------------

    async def meta(self, url: str, *, hint_block: int = 0, via: Sequence[str] = ()) -> ObjectMeta:
        """The record of ``url``'s current version (see :meth:`lookup`)."""
        return (await self.lookup(url, hint_block=hint_block, via=via)).meta

    async def lookup(
        self,
        url: str,
        *,
        hint_block: int = 0,
        first_byte: int | None = None,
        last_byte: int | None = None,
        via: Sequence[str] = (),
        reader: object | None = None,
        request: Sequence[tuple[str, str]] = (),
        _again: bool = True,
    ) -> Lookup:
        """The record of ``url``'s current version, asking upstream when the object is
        unknown (discovery) or stale (revalidation), and how it was obtained.

        Args:
          url: absolute http(s) URL.
          hint_block: the block a discovery should fetch (the one the caller needs);
            or give ``first_byte``, the first byte the caller needs, and ``last_byte``
            its last (a discovery's request then covers the blocks up to it too).
          via: the Via entries of the request that asks (sent upstream, so that a
            forwarding loop through other caches is detected).
          reader: any object naming the request, passed to :meth:`segments` too; the
            block a discovery fetches then counts as this reader's own, not a join.
          request: the request's header fields (selecting a variant, RFC 9111 s4.1).

        Raises:
          BadRequest: the URL is not allowed (403) or malformed (400).
          NotCacheable: upstream's answer must not be stored; forward instead.
          UpstreamError: upstream failed (and no stale copy may stand in).
        """
        self._see_changes()  # another worker's eviction, purge or new version
        key = self._variant_of(self.resolve(url), request)
        meta = self._record_of(key)
        if first_byte is not None:
            size = meta.block_size if meta is not None else self.config.block_size
            hint_block = first_byte // size
        now = time.time()
        fresh = self.config.freshness
        if meta is not None and now < self._fresh_until(meta):
            if self._discoveries:
                await self._wait_peer_discovery(key)
            return Lookup(meta, "fresh")
        span = (first_byte, last_byte)
        disc = self._discovery_for(url, key, hint_block, via, meta, reader, span)
        try:
            found = await disc.wait()
        except Varies as varies:  # the first answer varies: ask for this request's variant
            if not _again:
                raise NotCacheable(str(varies)) from None
            self._mark_varying(policy_object_key(key), varies.names)
            return await self.lookup(
                url, first_byte=first_byte, last_byte=last_byte, hint_block=hint_block,
                via=via, reader=reader, request=request, _again=False,
            )  # fmt: skip
        except UpstreamError:
            rules = self.config.refresh_patterns
            if meta is not None and may_serve_stale(
                meta, now, fresh.max_stale, rules, fresh.heuristic_max
            ):
                self.counters.stale_served += 1
                return Lookup(meta, "stale")
            raise
        await self._wait_peer_discovery(key, disc)
        return Lookup(found, disc.outcome, disc.upstream_status)

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

    def coverage(self, meta: ObjectMeta, spans: Sequence[tuple[int, int]]) -> str:
        """``hit``, ``miss`` or ``partial``: how much of the inclusive byte ``spans``
        of ``meta`` is stored and readable (decided before the head goes out, so a
        block lost from disk is announced as fetched, not as a hit)."""
        wanted = stored = 0
        for start, end in spans:
            blocks = blocks_for_range(start, end, meta.block_size)
            wanted += len(blocks)
            stored_blocks = self.store.block_map(meta, blocks.start, blocks.stop - 1)
            stored += sum(1 for d in stored_blocks.values() if self.store.readable(d))
        if stored == wanted:
            return "hit"
        return "miss" if stored == 0 else "partial"

    async def stat(self, url: str) -> ObjectInfo:
        """Size, validators and how much of ``url`` is stored (discovering it if new)."""
        meta = await self.meta(url)
        total = block_count(meta.size, meta.block_size)
        stored = self.store.block_map(meta, 0, max(total - 1, 0))
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
        found = await self.lookup(url, first_byte=start, last_byte=end, reader=reader)
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
        for variant in self._variants(key):
            self._metas.pop(variant)
            await self.store.forget_object(variant)
        self._metas.pop(key)
        return await self.store.forget_object(key)

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
        self._host_slots.resize(config.limits.upstream_connections_per_host)
        self.upstream.reconfigure(config)

    def statistics(self) -> Statistics:
        """A frozen snapshot of the counters (the engine's and the store's)."""
        return Statistics(**attrs.asdict(self.counters), **attrs.asdict(self.store.counters))

    # -- reading -------------------------------------------------------------------

    async def segments(
        self,
        meta: ObjectMeta,
        start: int,
        end: int,
        via: Sequence[str] = (),
        reader: object | None = None,
    ) -> AsyncGenerator[memoryview | FileSlice, None]:
        """The bytes ``start..end`` (inclusive, within the object) as file slices (of
        stored blobs or of blocks being filled) and in-memory chunks, in order.

        Raises:
          UpstreamError: a block could not be fetched (VersionChanged when the object
            changed upstream). Bytes yielded before are correct.
        """
        B = meta.block_size
        wanted = blocks_for_range(start, end, B)
        if not wanted:
            return
        stored = self.store.block_map(meta, wanted.start, wanted.stop - 1)
        claims: dict[int, Flight] = {}
        window = self._window(len(wanted), B)
        from_cache = from_upstream = 0
        joined = False  # waited on a fetch another reader started
        try:
            for idx in wanted:
                at = start if idx == wanted.start else None  # the reader's first byte
                joined |= self._claim_ahead(
                    meta, idx, wanted.stop - 1, stored, claims, via, reader, window.ahead, at,
                    window.run,
                )  # fmt: skip
                b_start, b_end = block_bounds(idx, B, meta.size)
                lo, hi = max(start, b_start) - b_start, min(end + 1, b_end) - b_start
                flight = claims.pop(idx, None)
                if flight is None:
                    digest = stored.get(idx)
                    if digest is None:  # stored by another reader's fetch since we looked
                        digest = self.store.block_map(meta, idx, idx).get(idx)
                    fd = await self.store.open_block(digest) if digest is not None else None
                    if fd is not None and digest is not None:
                        with self.store.pin(digest):
                            try:
                                yield FileSlice(fd, lo, hi - lo)
                            finally:
                                self.store.release(digest, fd)
                        from_cache += hi - lo
                        self.counters.bytes_from_cache += hi - lo
                        continue
                    # missing or corrupt on disk (or just evicted): fetch it again
                    stored.pop(idx, None)
                    flight, was_joined = self._claim_missing(meta, idx, via, reader, at)
                    joined |= was_joined
                starved = not flight.complete  # upstream sets the pace, not the client
                try:
                    async with aclosing(flight.read(lo, hi)) as chunks:
                        async for chunk in chunks:
                            n = chunk.length if isinstance(chunk, FileSlice) else len(chunk)
                            self.counters.bytes_from_upstream += n
                            yield chunk
                finally:
                    self._release(flight)
                filled = flight.filled_at
                took = None if filled is None else filled - flight.born
                window.step(trio.current_time(), starved=starved, fill_seconds=took)
                from_upstream += hi - lo
        finally:
            for flight in claims.values():
                self._release(flight)
            if joined:
                self.counters.flight_joins += 1
            if from_upstream == 0:
                self.counters.hits += 1
            elif from_cache == 0:
                self.counters.misses += 1
            else:
                self.counters.partial_hits += 1
            if stored:
                self.store.touch(set(stored.values()))


def _pread_all(s: FileSlice) -> bytes:
    out = os.pread(s.fd, s.length, s.offset)
    if len(out) != s.length:
        raise UpstreamError(f"blob is shorter than expected ({len(out)} < {s.length} bytes)")
    return out
