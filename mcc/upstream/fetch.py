"""Fetching a byte span of an object: the upstream vouches for every byte it hands on.

Theory of operation: :meth:`Fetcher.fetch` asks upstream for ``bytes=start-end`` of
a URL (through :class:`~mcc.upstream.client.Upstream`: parents, peers, origin) and
yields a :class:`Fetched`: the response head, and a body that carries exactly the
bytes the head promises, at known object offsets, or raises. Everything about HTTP
framing stays behind this line:

- a 206 must carry a Content-Range for exactly the span asked (the end clipped to
  the object), and a Content-Length, when present, equal to that span's length;
- a 200 (an origin that ignores Range) carries the whole object from byte 0;
- a body is cut at the end of what was promised: one byte more (a chunked or
  close-delimited body running on, a Content-Length larger than the span) fails
  the fetch, and so does a body that ends early;
- redirects are followed (at most :data:`MAX_REDIRECTS`) while they stay on the
  allowlist; one that leaves it is :class:`~mcc.errors.NotCacheable` (the client is
  sent to it itself). ``Fetched.url`` is where the bytes came from.

A 200 or 206 body is watched by the progress guard (:mod:`mcc.upstream.progress`):
a body that stalls or crawls raises :class:`~mcc.upstream.progress.Stalled`, naming
the route, and routes named in ``avoid`` are not asked at all.

What the response *means* for the cache (may it be stored, did the object change)
is not decided here: that is :mod:`mcc.policy`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Collection, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar
from urllib.parse import urljoin

import attrs
import trio

from ..errors import NotCacheable, UpstreamError
from ..headers import is_digits, parse_content_range, parse_unsatisfied_range
from .client import Upstream, UpstreamResponse, parse_http_url, quote_target
from .progress import Progress, Stalled
from .splice import Splicer

__all__ = ["MAX_REDIRECTS", "Conditions", "Fetched", "Fetcher"]

# Redirects followed in a row before giving up (RFC 9110 s15.4 leaves it to us;
# browsers use about 20; update CDNs use one or two).
MAX_REDIRECTS = 5
_T = TypeVar("_T")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@attrs.frozen
class Conditions:
    """Validators that make a fetch conditional (RFC 9110 s13)."""

    if_range: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None

    def headers(self) -> list[tuple[str, str]]:
        out = []
        for name, value in (
            ("if-range", self.if_range),
            ("if-none-match", self.if_none_match),
            ("if-modified-since", self.if_modified_since),
        ):
            if value:
                out.append((name, value))
        return out


class Fetched:
    """A response whose body is exactly the bytes it promises.

    Attributes:
      status / headers: as upstream sent them (hop-by-hop fields removed).
      url: where it came from (after redirects).
      first: the object offset of the body's first byte.
      stop: the offset just past its last byte (None: a 200 of unknown length).
      size: the object's size as the head states it (None when it does not).
    """

    def __init__(
        self, resp: UpstreamResponse, url: str, first: int, stop: int | None, size: int | None
    ) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.url = url
        self.first = first
        self.stop = stop
        self.size = size
        self._pos = first
        self._direct = resp.can_receive_into  # (the response forgets once complete)
        self.progress: Progress | None = None  # the guard, for 200 and 206 bodies

    @property
    def route_name(self) -> str:
        return self._resp.route.name

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        return self._resp.header(name)

    @property
    def unsatisfied_size(self) -> int | None:
        """For a 416: the object size its Content-Range states, if any."""
        return parse_unsatisfied_range(self._resp.header("content-range"))

    @property
    def can_receive_into(self) -> bool:
        """True when the body is framed by Content-Length (a body that cannot run
        past its promise); :meth:`receive_into` then reads with no extra copy."""
        return self._direct

    async def receive_into(self, buf: memoryview) -> int:
        """Receive body bytes into ``buf``; returns how many (0 at the end).

        Raises:
          UpstreamError: the connection broke, or the body lied about its length.
        """
        if not self._direct:
            raise TypeError("receive_into needs a body framed by Content-Length")
        want = len(buf) if self.stop is None else min(len(buf), self.stop - self._pos)
        if want <= 0:
            await self._expect_end()
            return 0
        n = await self._guarded(self._resp.receive_into(buf[:want]))
        self._judge(n)
        if not n:
            self._check_short()
        self._pos += n
        return n

    @property
    def can_splice(self) -> bool:
        """True when :meth:`splice_into` may be used now (a Content-Length body on a
        plain TCP connection: :mod:`mcc.upstream.splice`)."""
        return self._direct and self._resp.can_splice

    async def splice_into(self, splicer: Splicer, fd: int, offset: int, count: int) -> int:
        """Move up to ``count`` body bytes into file ``fd`` at ``offset``; returns how
        many (0 at the end). The same promise as :meth:`receive_into`: no byte past
        the span, a body ending early fails.

        Raises:
          UpstreamError: as :meth:`receive_into`.
          FileWriteError: the file could not be written.
        """
        want = count if self.stop is None else min(count, self.stop - self._pos)
        if want <= 0:
            await self._expect_end()
            return 0
        n = await self._guarded(self._resp.splice_into(splicer, fd, offset, want))
        self._judge(n)
        if not n:
            self._check_short()
        self._pos += n
        return n

    async def receive(self) -> bytes:
        """The next piece of the body; ``b""`` at its end.

        Raises:
          UpstreamError: as :meth:`receive_into`.
        """
        if self.stop is not None and self._pos >= self.stop:
            await self._expect_end()
            return b""
        data = await self._guarded(self._resp.receive())
        self._judge(len(data))
        if not data:
            self._check_short()
            return b""
        if self.stop is not None and self._pos + len(data) > self.stop:
            raise UpstreamError(
                f"{self.route_name}: body runs past byte {self.stop - 1}, the end of what "
                "it promised"
            )
        self._pos += len(data)
        return data

    async def _guarded(self, pending: Awaitable[_T]) -> _T:
        """Await a receive under the progress guard's deadline.

        Raises:
          Stalled: no byte came by the deadline.
        """
        progress = self.progress
        if progress is None:
            return await pending
        with trio.move_on_at(progress.deadline()):
            return await pending
        raise Stalled(
            f"{self.route_name}: no byte for {progress.rules.stall:g} s at byte "
            f"{self._pos}; abandoned",
            route=self.route_name,
        )

    def _judge(self, n: int) -> None:
        """Count ``n`` bytes received against the rate floor.

        Raises:
          Stalled: the body crawls below the floor.
        """
        if self.progress is None:
            return
        crawl = self.progress.received(n, trio.current_time())
        if crawl is not None:
            raise Stalled(f"{self.route_name}: {crawl}; abandoned", route=self.route_name)

    async def _expect_end(self) -> None:
        """At the promised end: the body must end here."""
        if self._resp.complete:
            return
        extra = await self._guarded(self._resp.receive())
        if extra or not self._resp.complete:
            raise UpstreamError(
                f"{self.route_name}: body runs past byte {self._pos - 1}, the end of what "
                "it promised"
            )

    def _check_short(self) -> None:
        if self.stop is not None and self._pos < self.stop:
            raise UpstreamError(
                f"{self.route_name}: body ended at byte {self._pos}, before {self.stop}"
            )


class Fetcher:
    """Span fetches over one :class:`Upstream` (its routes, pool and allowlist)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    @asynccontextmanager
    async def fetch(
        self,
        url: str,
        start: int,
        end: int | None,
        *,
        size: int | None = None,
        conditions: Conditions = Conditions(),
        via: Sequence[str] = (),
        block: int | None = None,
        extra: Sequence[tuple[str, str]] = (),
        avoid: Collection[str] = (),
    ) -> AsyncIterator[Fetched]:
        """GET bytes ``start..end`` (inclusive; ``end`` None: to the end) of ``url``.

        Args:
          size: the object's size when known: a 206 must state it.
          conditions: validators (If-Range, If-None-Match, If-Modified-Since).
          via: Via entries of the client request (for loop detection upstream).
          block: the block index, for routing to the peer that owns it.
          extra: more request fields (those selecting a variant, RFC 9111 s4.1).
          avoid: names of routes not to ask (abandoned as stalled).

        Yields:
          The response; for 200 and 206 its body is vouched for (see the module).
          Other statuses (304, 416, 4xx, 5xx) come with no body promise.

        Raises:
          UpstreamError: no route answered, or a 206 answered another span.
          Stalled: the head did not come within the stall timeout on the last route,
            or every route is avoided.
          NotCacheable: a redirect leads off the allowlist.
        """
        rules = self.upstream.progress_rules
        span = f"bytes={start}-" if end is None else f"bytes={start}-{end}"
        headers = [("range", span), *conditions.headers(), *(("via", v) for v in via), *extra]
        for hops in range(MAX_REDIRECTS + 1):
            async with AsyncExitStack() as stack:
                resp = await stack.enter_async_context(
                    self.upstream.request(
                        "GET", url, headers, block=block, avoid=avoid, stall=rules.stall
                    )
                )
                location = resp.header("location")
                if resp.status in _REDIRECTS and location:
                    url = self.follow(url, location)
                    continue
                got = self._vouch(resp, url, start, end, size)
                if got.status in (200, 206):
                    got.progress = Progress(rules, trio.current_time())
                yield got
                return
            del hops
        raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects", status_hint=508)

    @asynccontextmanager
    async def head(
        self, url: str, *, via: Sequence[str] = (), extra: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[Fetched]:
        """HEAD ``url`` (redirects followed as by :meth:`fetch`); no body."""
        headers = [*(("via", v) for v in via), *extra]
        for _ in range(MAX_REDIRECTS + 1):
            async with AsyncExitStack() as stack:
                resp = await stack.enter_async_context(self.upstream.request("HEAD", url, headers))
                location = resp.header("location")
                if resp.status in _REDIRECTS and location:
                    url = self.follow(url, location)
                    continue
                length = resp.header("content-length")
                size = int(length) if length is not None and is_digits(length) else None
                yield Fetched(resp, url, 0, 0, size)
                return
        raise UpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects", status_hint=508)

    def follow(self, url: str, location: str) -> str:
        """Where a redirect from ``url`` leads, if mcc may follow it.

        Raises:
          NotCacheable: it leads off the allowlist (or off http(s)://): the client
            gets the redirect itself and decides.
        """
        target = quote_target(urljoin(url, location.strip()))
        try:
            host, port, _ = parse_http_url(target)
        except ValueError:
            raise NotCacheable(f"redirect to {target[:200]!r} (not http:// or https://)") from None
        if not self.upstream.policy.allows(host, port):
            raise NotCacheable(f"redirect to {host}:{port}, which is not allowed")
        return target

    @staticmethod
    def _vouch(
        resp: UpstreamResponse, url: str, start: int, end: int | None, size: int | None
    ) -> Fetched:
        name = resp.route.name
        if resp.status == 206:
            cr = parse_content_range(resp.header("content-range"))
            if cr is None or cr[2] is None:
                raise UpstreamError(
                    f"{name}: a 206 with Content-Range {resp.header('content-range')!r}"
                )
            first, last, total = cr[0], cr[1], cr[2]
            want_last = total - 1 if end is None else min(end, total - 1)
            if first != start or last != want_last or (size is not None and total != size):
                asked = f"{start}-{'' if end is None else end}"
                raise UpstreamError(
                    f"{name}: asked bytes {asked}"
                    f"{'' if size is None else f'/{size}'}, got Content-Range "
                    f"{resp.header('content-range')!r}"
                )
            length = resp.header("content-length")
            if length is not None and length.strip() != str(last - first + 1):
                raise UpstreamError(
                    f"{name}: Content-Length {length[:20]!r} does not match the "
                    f"Content-Range's {last - first + 1} bytes"
                )
            return Fetched(resp, url, first, last + 1, total)
        if resp.status == 200:
            length = resp.header("content-length")
            whole = int(length) if length is not None and is_digits(length) else None
            return Fetched(resp, url, 0, whole if whole is not None else size, whole)
        return Fetched(resp, url, start, start, None)
