"""Discovery: learning an object's record, and revalidating a stale one.

Theory of operation: the first read of an unknown URL fetches the block it needs
with a plain range request; the answer's Content-Range gives the size while its body
fills that block. Concurrent first readers share one :class:`Discovery` (one per key
in the table, changed only by synchronous code). A stale record is revalidated the
same way, conditionally (If-None-Match / If-Modified-Since): a 304 refreshes the
record, a new version replaces it. A block past the end (416) or an empty object is
learned from a HEAD instead. Failures before the head arrived are retried like block
fetches; a failure after it is the fill's, and resumes like one.

In a cluster (``peers``), a discovery goes to the peer owning its block; a request
from a peer never waits on such a discovery (two nodes could wait on each other):
it discovers on its own, and local readers wait for it so no block is fetched twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import attrs
import trio

from .. import policy
from ..errors import NotCacheable, Refused, UpstreamError
from ..store.records import ObjectMeta
from ..upstream.fetch import Conditions, Fetched
from ..upstream.peers import peer_request
from ..upstream.progress import Stalled
from .fill import MAX_ROUTE_MOVES, backoff
from .flight import Fetch
from .readahead import host_of
from .runs import run_blocks
from .spans import SPLIT_MIN
from .variants import Varies, Varying

__all__ = ["Discovering", "Discovery"]

log = logging.getLogger("mcc.engine")


class _Unsatisfied(Exception):
    """Internal: upstream answered a discovery's range with 416."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


class Discovery:
    """One discovery in progress, shared by every reader that needs its record."""

    def __init__(self, slot: str, via_peer: bool) -> None:
        self.slot = slot  # its key in the table of discoveries
        self.via_peer = via_peer  # asks the peer owning its block (else parents, origin)
        self.done = trio.Event()
        self.meta: ObjectMeta | None = None
        self.error: Exception | None = None
        self.outcome = "miss"  # or "revalidated" (304) or "changed" (a new version)
        self.upstream_status = 0  # the status of upstream's answer (304, 200, 206...)

    async def wait(self) -> ObjectMeta:
        await self.done.wait()
        if self.meta is not None:
            return self.meta
        assert self.error is not None
        if isinstance(self.error, UpstreamError):
            raise type(self.error)(str(self.error), status_hint=self.error.status_hint)
        if isinstance(self.error, Varies):
            raise Varies(self.error.names)
        if isinstance(self.error, NotCacheable):
            raise NotCacheable(str(self.error))
        raise UpstreamError(f"discovery failed: {self.error}")


class Discovering(Varying):
    """The engine's discoveries (see the module)."""

    def _init_discovery(self) -> None:
        self._discoveries: dict[str, Discovery] = {}

    def _discovery_for(
        self,
        url: str,
        key: str,
        hint_block: int,
        via: Sequence[str],
        stale: ObjectMeta | None,
        reader: object | None,
        span: tuple[int | None, int | None] = (None, None),
    ) -> Discovery:
        """The discovery of ``key`` to wait on: joined, or started here (asking from
        the reader's first byte of block ``hint_block`` through its last, when given
        in ``span``)."""
        disc = self._discoveries.get(key)
        slot = key
        if disc is not None and disc.via_peer and peer_request() is not None:
            slot = f"peer {key}"
            disc = self._discoveries.get(slot)
        if disc is None:
            via_peer = (
                peer_request() is None and self.upstream.peers.owner(url, hint_block) is not None
            )
            disc = Discovery(slot, via_peer)
            self._discoveries[slot] = disc
            args = (url, key, hint_block, disc, tuple(via), stale, reader, span)
            self._spawn(self._discover_in_turn, *args)
        return disc

    async def _wait_peer_discovery(self, key: str, disc: Discovery | None = None) -> None:
        """Wait while a discovery for a peer is fetching its block here: that block is
        in flight only once it is done, and must not be fetched twice."""
        side = self._discoveries.get(f"peer {key}")
        if side is not None and side is not disc:
            await side.done.wait()

    async def _discover_in_turn(
        self,
        url: str,
        key: str,
        hint: int,
        disc: Discovery,
        via: tuple[str, ...],
        stale: ObjectMeta | None,
        reader: object | None = None,
        span: tuple[int | None, int | None] = (None, None),
    ) -> None:
        """:meth:`_discover`, one worker of the node at a time (see
        :mod:`mcc.engine.claimed`): the record another worker filed meanwhile is used.
        Shared fills grow from the block's start (another worker's readers follow the
        file's size), so a shared store discovers from there, not from the reader's first byte."""
        try:
            found = await self._discovery_turn(key, stale, disc.done)
        except BaseException:
            self._discoveries.pop(disc.slot, None)
            disc.error = UpstreamError(f"{url}: discovery abandoned")
            disc.done.set()
            raise
        if found is None:
            if self._shared() is not None:
                span = (None, span[1])
            await self._discover(url, key, hint, disc, via, stale, reader, span)
            return
        disc.meta = found
        self._discoveries.pop(disc.slot, None)
        disc.done.set()

    async def _discover(
        self,
        url: str,
        key: str,
        hint: int,
        disc: Discovery,
        via: tuple[str, ...],
        stale: ObjectMeta | None,
        reader: object | None = None,
        span: tuple[int | None, int | None] = (None, None),
    ) -> None:
        """Learn ``key``'s record from a range request for block ``hint`` (made
        conditional when a stale copy is stored), and fill that block from its body;
        the request starts at the reader's first byte (``span[0]``) when that lies in
        the block (its first byte then waits for no earlier one:
        :mod:`mcc.engine.spans`), and ends at the end of the block holding its last
        (``span[1]``), at most :func:`~mcc.engine.runs.run_blocks` blocks in all:
        the body fills the blocks after the first too, one request for the range."""
        # a stale object keeps the block size it was stored with
        B = stale.block_size if stale is not None else self.config.block_size
        asked = hint * B
        first, last = span
        if first is not None and first // B == hint and first - asked >= SPLIT_MIN:
            asked = first
        last_block = hint
        if last is not None and last >= asked and not disc.via_peer:  # (a peer's: its own)
            last_block = min(last // B, hint + run_blocks(B) - 1)
        asked_end = (last_block + 1) * B - 1  # (past the object's end: a shorter answer)
        conditions = Conditions()
        if stale is not None and stale.etag:
            conditions = Conditions(if_none_match=stale.etag)
        elif stale is not None and stale.last_modified:
            conditions = Conditions(if_modified_since=stale.last_modified)
        if stale is not None and stale.fetch_url:
            url = stale.fetch_url  # where it lives (after redirects)
        retries = self.config.limits.upstream_retries
        attempt = 0
        avoid: set[str] = set()  # routes abandoned as stalled
        try:
            while True:
                try:
                    try:
                        await self._discover_once(
                            url, key, (asked, asked_end), B, disc, via, stale, conditions,
                            reader, avoid,
                        )  # fmt: skip
                    except _Unsatisfied as unsatisfied:
                        # the block asked for lies past the end (or the object is
                        # empty): learn the record from a HEAD instead
                        meta = await self._discover_by_head(url, key, unsatisfied.size, B, via)
                        self._adopt(meta)
                        disc.meta = meta
                    return
                except UpstreamError as exc:
                    moved = (
                        isinstance(exc, Stalled)
                        and exc.route is not None
                        and exc.route not in avoid
                        and len(avoid) < MAX_ROUTE_MOVES
                    )
                    if (
                        disc.done.is_set()
                        or (attempt == retries and not moved)
                        or isinstance(exc, Refused)
                        or exc.status_hint == 508  # a redirect loop: asking again loops again
                        or (isinstance(exc, Stalled) and not moved)  # no route left
                    ):
                        raise
                    if moved:  # the next route, at once (no retry spent)
                        assert isinstance(exc, Stalled) and exc.route is not None
                        avoid.add(exc.route)
                        log.info("%s; discovering %s on the next route", exc, url)
                        continue
                    log.info("retrying discovery of %s after: %s", url, exc)
                    await trio.sleep(backoff(attempt))
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
        asked_span: tuple[int, int],
        B: int,
        disc: Discovery,
        via: tuple[str, ...],
        stale: ObjectMeta | None,
        conditions: Conditions,
        reader: object | None,
        avoid: set[str],
    ) -> None:
        asked, asked_end = asked_span
        block = asked // B if disc.via_peer else None
        fetch_cm = self.fetcher.fetch(
            url,
            asked,
            asked_end,
            conditions=conditions,
            via=via,
            block=block,
            extra=policy.selecting_fields(key),
            avoid=avoid,
        )
        async with self._fetch_slots, self._host_slots.slot(host_of(url)), fetch_cm as got:
            self.counters.upstream_fetches += 1
            disc.upstream_status = got.status
            now = time.time()
            if got.status == 304 and stale is not None:
                meta = policy.refreshed(stale, got.headers, now)
                self._adopt(meta)
                disc.meta, disc.outcome = meta, "revalidated"
                disc.done.set()
                return
            if got.status == 416:
                raise _Unsatisfied(got.unsatisfied_size)
            if stale is not None and got.status >= 500:
                # an error, not a verdict on the stored copy: stale-if-error may apply
                raise UpstreamError(f"{url}: upstream answered {got.status} to revalidation")
            meta = self._record(key, got, B)
            if stale is not None and meta.version == stale.version:
                # upstream resent the same version: its fields update the stored ones
                # (RFC 9111 s3.2), the blocks stay
                meta = attrs.evolve(policy.refreshed(stale, got.headers, now), fetch_url=got.url)
                disc.outcome = "revalidated"
            elif stale is not None:
                disc.outcome = "changed"
            # the block's fill is claimed before the record is filed: another worker
            # finding the record then finds the fill too, and follows it
            fetch = self._start_fill(meta, got.first, reader, via)
            try:  # (flights are in the table now: a fault must fail them, not strand them)
                if fetch.flights and got.status == 206:  # (a 200 streams: engine.streams)
                    self._claim_following(meta, fetch, got.first // B, got.stop, reader)
                self._adopt(meta)
            except BaseException:
                self._end_fetch(meta, fetch)
                raise
            disc.meta = meta
            disc.done.set()
            broken: UpstreamError | None = None
            with fetch.cancel_scope:
                try:
                    async with trio.open_nursery() as commits:  # see Filling._fill
                        try:
                            await self._fill(meta, fetch, got, commits)
                        except UpstreamError as exc:
                            broken = exc
                except BaseException:
                    self._end_fetch(meta, fetch)
                    raise
        # out of the response (and its upstream slot): resume what the body left undone
        if isinstance(broken, Stalled) and broken.route is not None:
            avoid.add(broken.route)
        await self._resume(meta, fetch, via, broken, frozenset(avoid))

    async def _resume(
        self,
        meta: ObjectMeta,
        fetch: Fetch,
        via: tuple[str, ...],
        broken: UpstreamError | None,
        avoid: frozenset[str] = frozenset(),
    ) -> None:
        try:
            if broken is not None and not fetch.cancel_scope.cancel_called:
                log.info("resuming %s after: %s", meta.source, broken)
                fetch.cancel_scope = trio.CancelScope()  # a scope is entered only once
                with fetch.cancel_scope:
                    await self._fetch_with_retries(meta, fetch, via, avoid)
        finally:
            self._end_fetch(meta, fetch)

    def _record(self, key: str, got: Fetched, block_size: int) -> ObjectMeta:
        """The record a discovery's answer makes.

        Raises:
          NotCacheable: the answer must not be stored (forward instead).
        """
        refusal = policy.refusal(got.status, got.headers)
        if refusal is not None:
            raise NotCacheable(refusal)
        names = policy.vary_names(got.headers)
        if names and names != policy.variant_names(key):
            raise Varies(names)  # the lookup asks again for the request's variant
        if names:
            self._admit_variant(key)
        if got.size is None:
            raise NotCacheable("upstream sent no Content-Length")
        return policy.record(
            key,
            got.size,
            got.headers,
            now=time.time(),
            fetch_url=got.url,
            block_size=block_size,
        )

    async def _discover_by_head(
        self, url: str, key: str, size: int | None, block_size: int, via: tuple[str, ...]
    ) -> ObjectMeta:
        head = self.fetcher.head(url, via=via, extra=policy.selecting_fields(key))
        host = self._host_slots.slot(host_of(url))
        async with self._fetch_slots, host, head as got:
            self.counters.upstream_fetches += 1
            meta = self._record(key, got, block_size)
        if size is not None and size != meta.size:
            raise UpstreamError(f"{url}: HEAD says {meta.size} bytes, a 416 said {size}")
        return meta
