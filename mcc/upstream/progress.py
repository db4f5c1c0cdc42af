"""The progress guard: an upstream body that stalls or crawls is abandoned.

Theory of operation: a response body is watched by a :class:`Progress` (sans-I/O
bookkeeping; the caller passes the clock). Two rules, from ``[timeouts]``:

- **stall**: no byte (nor the response head) for ``stall`` seconds;
- **crawl**: fewer than ``min_rate`` bytes per second over a window of
  ``min_rate_window`` seconds (each window judged as it closes, then a new one starts).

Either one raises :class:`Stalled`, naming the route: the fill then resumes from the
byte reached on the *next* route (the next parent, then the origin) with If-Range,
and, once every route was abandoned, fails with 504 (or cuts the client's response
when it already has bytes).

Why these defaults (stall 5 s, 4000 B/s over 8 s): the Delivery Optimization agent
gives up on a cache that delivers below 4,000 B/s for 20 s and falls back to the CDN;
mcc cannot deliver faster than its upstream, so an upstream below that floor loses
the client anyway. Judging it over 8 s (and a silence over 5 s) leaves time for one
more route, or for a clean 504 that sends the agent to the CDN at once, so no client
waits more than about 10 s without progress.
"""

from __future__ import annotations

import attrs

from ..errors import UpstreamError

__all__ = ["Progress", "ProgressRules", "Stalled"]


class Stalled(UpstreamError):
    """A route delivered too slowly (or nothing) and was abandoned.

    Args:
      message: what was too slow, naming the route.
      status_hint: 504 (a gateway timeout).
      route: the name of the abandoned route; None when every route was.
    """

    def __init__(self, message: str, *, status_hint: int = 504, route: str | None = None) -> None:
        super().__init__(message, status_hint=status_hint)
        self.route = route


@attrs.frozen
class ProgressRules:
    """The guard's limits (seconds; bytes per second, 0 for no floor)."""

    stall: float
    min_rate: int
    window: float


class Progress:
    """The progress of one body, judged against ``rules``.

    Args:
      rules: the limits.
      now: the clock when the head arrived.
    """

    def __init__(self, rules: ProgressRules, now: float) -> None:
        self.rules = rules
        self._last = now
        self._window_start = now
        self._window_bytes = 0

    def deadline(self) -> float:
        """The clock time by which the next byte must arrive."""
        return self._last + self.rules.stall

    def received(self, n: int, now: float) -> str | None:
        """Count ``n`` bytes received at ``now``.

        Returns:
          None, or why the body is crawling (below the rate floor over a window).
        """
        if n:
            self._last = now
        self._window_bytes += n
        elapsed = now - self._window_start
        if elapsed < self.rules.window:
            return None
        floor = self.rules.min_rate * elapsed
        if self._window_bytes < floor:
            return (
                f"{self._window_bytes} bytes in {elapsed:.1f} s, below the floor of "
                f"{self.rules.min_rate} bytes/s"
            )
        self._window_start, self._window_bytes = now, 0
        return None
