"""Adaptive read-ahead: how many blocks a sequential reader keeps in flight, and how
many upstream requests one origin host gets at once.

Theory of operation: a reader walking an object's blocks in order keeps the block it
reads plus ``depth`` further blocks claimed (stored, joined or fetched, each fetch its
own upstream connection). A :class:`Window` starts at ``readahead_blocks`` and judges
itself in *epochs* of ``max(_EPOCH_MIN, 2 * (depth + 1))`` blocks read (fills start
and end in bursts, so a shorter epoch measures the burst, not the rate):

- a reader that reached a block still being filled was *starved*: upstream, not the
  client, set the pace. When an epoch saw a starved block, ``depth`` grows by one
  (an origin that limits each connection, as a CDN edge over a WAN does, then sends
  one connection's worth more);
- the epoch after a growth is compared with the one before it, by each fill's own
  rate (claim to last byte) times the fills in flight, which averages whole fills
  where the reader's pace comes in bursts: unless blocks came
  at least ``_GAIN`` faster, the extra connection bought nothing (the link, the
  origin or this node's CPU is the limit), so ``depth`` steps back and holds for
  ``_HOLD`` epochs before it may try again (conditions change; one noisy epoch
  must not pin a long download to a small window);
- ``depth`` never exceeds ``max_parallel_fetches - 1`` (with the block being read,
  ``max_parallel_fetches`` in flight) nor the per-host cap minus one.

A reader that is never starved (a slow client, or blocks already stored) never grows
its window. ``readahead_blocks = 0`` turns read-ahead off, adaptive part included.

Each fetch may cover a *run* of several blocks (one upstream request: see
:mod:`mcc.engine.runs`); ``depth`` then counts runs, ``run`` blocks each. ``run``
starts at 1 (so the window adapts at block pace while connections are what limits)
and doubles, up to ``max_run``, after every epoch in which ``depth`` did not grow:
once more connections stop paying, larger requests cut what each costs to start.

Delivery Optimization asks for many ranges at once rather than one long one: each
request claims only its own blocks (read-ahead stays inside the range asked), so its
parallelism is the client's, and what keeps the origin safe is :class:`HostSlots`:
every block fetch and discovery takes a slot of its origin host, at most
``upstream_connections_per_host`` at once (the pool keeps no more idle than that
either, so the connections one host sees for cached objects stay within the cap;
requests forwarded uncached, such as a POST or a ``no-store`` answer, do not take
slots).

The window is plain synchronous arithmetic on times it is given (sans-I/O), so it is
tested with made-up clocks.
"""

from __future__ import annotations

import math

import attrs
import trio

__all__ = ["HostSlots", "Window", "host_of"]

# A further connection is kept only if blocks then came at least this much faster
# (per-connection limits give ~1/depth more per step; noise on a loaded machine is
# a few per cent, so a step smaller than this is not told apart from noise).
_GAIN = 0.08
# Blocks in the shortest epoch, and epochs a window holds after a growth that did
# not pay (with 1 MiB blocks: at least 8 MiB per judgement, a retry every ~50 MiB).
_EPOCH_MIN = 8
_HOLD = 3
# Host limiters kept without borrowers before the idle ones are dropped.
_IDLE_HOSTS = 1024


@attrs.define
class Window:
    """One sequential reader's read-ahead depth (see the module).

    Args:
      depth: blocks kept claimed beyond the one being read (``readahead_blocks``).
      ceiling: the most ``depth`` may grow to.
      now: the time the reader starts (any clock, seconds).
    """

    depth: int
    ceiling: int
    now: float = 0.0
    grown_by: int = 0  # how many times depth grew (for tests and logs)
    max_run: int = 1  # the most blocks one fetch may cover
    run: int = attrs.field(init=False, default=1)  # blocks per fetch now
    held: int = 0  # epochs left before depth may grow again
    off: bool = attrs.field(init=False, default=False)  # read-ahead off: never adapts
    _epoch_start: float = attrs.field(init=False)
    _epoch_blocks: int = attrs.field(init=False, default=0)
    _epoch_starved: bool = attrs.field(init=False, default=False)
    _epoch_fills: int = attrs.field(init=False, default=0)
    _epoch_fill_seconds: float = attrs.field(init=False, default=0.0)
    _last_rate: float | None = attrs.field(init=False, default=None)
    _just_grew: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.ceiling = max(self.ceiling, 0)
        self.depth = min(self.depth, self.ceiling)
        self.off = self.depth == 0  # read-ahead off (or no room): nothing to adapt
        self._epoch_start = self.now

    @property
    def epoch(self) -> int:
        """Blocks in the current epoch."""
        return max(_EPOCH_MIN, 2 * (self.depth + 1) * self.run)

    @property
    def ahead(self) -> int:
        """Blocks kept claimed beyond the one being read: ``depth`` runs more."""
        return (self.depth + 1) * self.run - 1

    def step(self, now: float, *, starved: bool, fill_seconds: float | None = None) -> None:
        """The reader moved past one block at time ``now``; ``starved`` when that block
        was still being filled as the reader reached it; ``fill_seconds`` how long that
        block took from its claim to its last byte (None when unknown)."""
        if self.off:
            return
        self._epoch_blocks += 1
        self._epoch_starved |= starved
        if fill_seconds is not None and fill_seconds > 0:
            self._epoch_fills += 1
            self._epoch_fill_seconds += fill_seconds
        if self._epoch_blocks < self.epoch:
            return
        rate = self._rate(now)
        last = self._last_rate
        if self._just_grew and last is not None and rate is not None and rate < last * (1 + _GAIN):
            self.depth -= 1  # the last connection bought nothing: give it back
            self.held = _HOLD
            rate = last  # the rate at the depth held
        elif self.held:
            self.held -= 1
        elif self._epoch_starved and self.depth < self.ceiling:
            self.depth += 1
            self.grown_by += 1
            self._just_grew = True
            self._last_rate = rate
            self._restart(now)
            return
        self.run = min(self.max_run, self.run * 2)  # depth holds: fewer, larger requests
        self._just_grew = False
        self._last_rate = rate
        self._restart(now)

    def _rate(self, now: float) -> float | None:
        """Blocks per second this epoch: each fill's own rate times the fills kept in
        flight when fill times are known (it averages every block's whole fill, where
        the reader's pace moves in bursts), else the reader's own pace."""
        if self._epoch_fills:
            # (the blocks of a run fill one after another: on average (run + 1) / 2
            # blocks' time from the claim)
            per_fill = self._epoch_fills / self._epoch_fill_seconds
            return per_fill * (self.depth + 1) * (self.run + 1) / 2
        elapsed = now - self._epoch_start
        return self._epoch_blocks / elapsed if elapsed > 0 else None

    def _restart(self, now: float) -> None:
        self._epoch_start = now
        self._epoch_blocks = 0
        self._epoch_starved = False
        self._epoch_fills = 0
        self._epoch_fill_seconds = 0.0


def host_of(url: str) -> str:
    """The ``host[:port]`` of an absolute URL, lower-cased (the key of its slots)."""
    return url.partition("://")[2].partition("/")[0].partition("?")[0].lower()


def _tokens(per_host: int) -> float:
    return per_host if per_host > 0 else math.inf


class HostSlots:
    """At most ``per_host`` upstream requests in flight per origin host at once.

    Args:
      per_host: the cap (``limits.upstream_connections_per_host``; 0: no cap, as 0
        also means no pooling).
    """

    def __init__(self, per_host: int) -> None:
        self.per_host = _tokens(per_host)
        self._hosts: dict[str, trio.CapacityLimiter] = {}

    def slot(self, host: str) -> trio.CapacityLimiter:
        """The limiter of ``host`` (an ``authority`` string), made on first use."""
        limiter = self._hosts.get(host)
        if limiter is None:
            if len(self._hosts) >= _IDLE_HOSTS:
                self._hosts = {h: x for h, x in self._hosts.items() if x.borrowed_tokens}
            limiter = self._hosts[host] = trio.CapacityLimiter(self.per_host)
        return limiter

    def resize(self, per_host: int) -> None:
        """Take a reloaded cap (requests in flight keep their slots)."""
        self.per_host = _tokens(per_host)
        for limiter in self._hosts.values():
            limiter.total_tokens = self.per_host

    def in_use(self, host: str) -> int:
        """Slots of ``host`` taken now."""
        limiter = self._hosts.get(host)
        return 0 if limiter is None else limiter.borrowed_tokens
