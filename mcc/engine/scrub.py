"""The background scrub: stored blobs re-verified while the node runs.

Theory of operation: a blob is checked against its digest on its first read after a
start (``verify_on_read = "first"``); one that rots on disk later would be served
as it is. The scrub walks every stored blob in passes, re-hashing each through
:func:`~mcc.store.check.check_blob` (which quarantines a corrupt one, so it
stops being served and its block is fetched again), and sleeps between blobs so the
walk reads no more than ``limits.scrub_rate`` bytes per second. The rate is read
again before each blob: a reload may change it, and 0 turns the scrub off. Passes
follow each other (the rate alone bounds the reads); one finds what was stored
since the last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from ..store.check import blob_page, check_blob
from ..store.store import Store

__all__ = ["Scrub"]

log = logging.getLogger("mcc.engine")

# Seconds between looks while the scrub is off or nothing is stored (a pass over a
# full store starts right after the last one: the rate alone bounds its reads).
_IDLE_PAUSE = 1.0
# Blobs listed per index query (each a short query on the event loop).
_PAGE = 256


@attrs.define
class Scrub:
    """The scrub of one store.

    Args:
      store: what it checks.
      rate: returns the bytes per second to read (0: paused).
    """

    store: Store
    rate: Callable[[], int]
    passes: int = 0
    checked_blobs: int = 0
    checked_bytes: int = 0
    corrupt: int = 0

    async def run(self) -> None:
        """Scrub until cancelled (a task in the engine's nursery)."""
        while True:
            checked = self.checked_blobs
            if self.rate() > 0:
                await self.one_pass()
            if self.checked_blobs == checked:  # off, or nothing stored
                await trio.sleep(_IDLE_PAUSE)
            else:
                await trio.lowlevel.checkpoint()

    async def one_pass(self) -> bool:
        """Check every blob stored when the pass starts (and those stored meanwhile
        past its place in digest order), at the rate, reading the list in pages.

        Returns:
          True when the pass ended, False when the scrub was turned off meanwhile.
        """
        after = ""
        while page := blob_page(self.store, after, _PAGE):
            for digest, size in page:
                rate = self.rate()
                if rate <= 0:
                    return False
                started = trio.current_time()
                verdict = await check_blob(self.store, digest)
                if verdict is not None:
                    self.checked_blobs += 1
                    self.checked_bytes += size
                if verdict is False:
                    self.corrupt += 1
                await trio.sleep_until(started + size / rate)
            after = page[-1][0]
        self.passes += 1
        log.debug("scrub pass %d done: %d blobs so far", self.passes, self.checked_blobs)
        return True
