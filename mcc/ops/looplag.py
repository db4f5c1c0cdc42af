"""The loop-lag probe: how long the event loop runs without looking at the network.

Theory of operation: trio alternates between waiting for I/O and running, one after
another, every task that became ready (a batch). A connection whose bytes arrive
while a batch runs waits until the batch ends, so the length of each batch is the
lag the loop adds to every request at that moment; a blocking call or a long stretch
of Python in one task shows up as one long batch (a stall). :class:`LoopLag` is a
trio instrument: ``after_io_wait`` starts a batch, ``before_io_wait`` ends it, and
its length is recorded. That costs two clock reads per batch (not per task step),
and, unlike a ticking task, it never keeps the loop busy, so
``wait_all_tasks_blocked`` still works in tests.

Each batch goes into a cumulative histogram (:data:`LAG_BUCKETS`, for Prometheus)
and into per-second histograms of finer, geometric bounds kept for the last
:data:`RECENT_SECONDS`, from which :meth:`LoopLag.recent` gives the 99th percentile
(as the upper bound of its fine bucket, at most :data:`_FINE_STEP` times the true
value) and the exact maximum (what the benchmark reads right after a run).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque

import attrs
import trio

__all__ = ["LAG_BUCKETS", "RECENT_SECONDS", "LagStats", "LoopLag"]

# Histogram bounds in seconds, dense around the 20 ms a stall may not exceed (issue
# 17), so that a percentile over any interval (the difference of two scrapes, as the
# benchmark takes it) lands in a narrow bucket.
LAG_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
)  # fmt: skip
# The window :meth:`LoopLag.recent` summarises (a benchmark run of 5 s fits).
RECENT_SECONDS = 10
# Fine bounds for the recent percentile: from 10 us, each 1.25 times the last, to
# about 10 s (63 bounds); a percentile read from them is off by at most 25 %.
_FINE_STEP = 1.25
_FINE_BOUNDS = tuple(1e-5 * _FINE_STEP**i for i in range(63))


@attrs.frozen
class LagStats:
    """Batch lengths over a window, in seconds (all 0 when there were none)."""

    samples: int
    p99: float
    max: float


class _Second:
    __slots__ = ("counts", "max", "t")

    def __init__(self, t: int) -> None:
        self.t = t
        self.counts = [0] * (len(_FINE_BOUNDS) + 1)
        self.max = 0.0


class LoopLag(trio.abc.Instrument):
    """The probe and its numbers. :meth:`run` installs it in the running trio loop
    until cancelled (run it in the nursery that owns the loop's work)."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LAG_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.max = 0.0  # since start
        self._seconds: deque[_Second] = deque(maxlen=RECENT_SECONDS + 1)
        self._batch_started: float | None = None

    # -- the instrument hooks (called by trio, sync) --------------------------------

    def after_io_wait(self, timeout: float) -> None:
        self._batch_started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        started = self._batch_started
        if started is not None:
            now = time.perf_counter()
            self.observe(now - started, time.monotonic())
            self._batch_started = None

    # -- the numbers ----------------------------------------------------------------

    def observe(self, lag: float, now: float) -> None:
        """Count one batch that ran ``lag`` seconds, ending at ``now`` (monotonic)."""
        lag = max(0.0, lag)
        self.buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self.sum += lag
        self.count += 1
        if lag > self.max:
            self.max = lag
        t = int(now)
        if not self._seconds or self._seconds[-1].t != t:
            self._seconds.append(_Second(t))
        sec = self._seconds[-1]
        sec.counts[bisect.bisect_left(_FINE_BOUNDS, lag)] += 1
        if lag > sec.max:
            sec.max = lag

    def cumulative(self) -> list[tuple[str, int]]:
        """(``le`` label, batches at most that long) for each bound, +Inf last."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*LAG_BUCKETS, None), self.buckets, strict=True):
            total += n
            out.append(("+Inf" if bound is None else repr(bound), total))
        return out

    def recent(self, now: float, seconds: int = RECENT_SECONDS) -> LagStats:
        """The 99th percentile (nearest rank, as its fine bucket's upper bound, never
        above the maximum) and the maximum of the batches of the whole seconds from
        ``now - seconds`` to ``now`` (``time.monotonic()``)."""
        first = int(now) - seconds
        window = [s for s in self._seconds if first <= s.t <= int(now)]
        counts = [sum(col) for col in zip(*(s.counts for s in window), strict=True)]
        total = sum(counts)
        if not total:
            return LagStats(0, 0.0, 0.0)
        top = max(s.max for s in window)
        rank = max(1, math.ceil(0.99 * total))
        seen = 0
        for i, n in enumerate(counts):
            seen += n
            if seen >= rank:
                bound = _FINE_BOUNDS[i] if i < len(_FINE_BOUNDS) else top
                return LagStats(total, min(bound, top), top)
        raise AssertionError("unreachable: rank <= total")  # pragma: no cover

    async def run(self) -> None:
        """Record the loop's batches until cancelled."""
        trio.lowlevel.add_instrument(self)
        try:
            await trio.sleep_forever()
        finally:
            trio.lowlevel.remove_instrument(self)
