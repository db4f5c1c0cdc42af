"""Warm jobs: ``POST /warm`` pre-seeds a list of URLs in the background, and
``GET /warm/<id>`` shows its progress in objects and bytes.

A job first asks the size of each URL (one discovery each) so that its progress has a
total in bytes, then warms them one after the other. A URL that fails is counted and
its error kept; an unexpected exception fails that URL only (counted under
``mcc_internal_errors_total{where="warm"}``), never the admin listener's nursery.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..engine.engine import Cache
from ..errors import BadRequest, McError

__all__ = ["MAX_JOBS", "MAX_RUNNING_JOBS", "MAX_WARM_URLS", "WarmJob", "WarmJobs"]

# URLs in one warm job (a 1 MiB body of short URLs would be ~20,000).
MAX_WARM_URLS = 10_000
# Warm jobs remembered for GET /warm/<id>.
MAX_JOBS = 100
# Warm jobs running at once; more get 503 (each holds its URL list until it ends).
MAX_RUNNING_JOBS = 16


@attrs.define
class WarmJob:
    """One POST /warm request's progress, in objects and in bytes."""

    id: str
    urls: list[str]
    done: int = 0
    failed: int = 0
    bytes: int = 0  # read so far (from the store or upstream), updated as blocks arrive
    total_bytes: int = 0  # the sizes of the URLs found so far
    state: str = "running"
    errors: list[str] = attrs.field(factory=list)
    started: float = attrs.field(factory=time.monotonic)
    ended: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The job as ``GET /warm/<id>`` shows it."""
        elapsed = (self.ended or time.monotonic()) - self.started
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        left = self.total_bytes - self.bytes
        return {
            "id": self.id,
            "total": len(self.urls),
            "done": self.done,
            "failed": self.failed,
            "bytes": self.bytes,
            "totalBytes": self.total_bytes,
            "bytesPerSecond": round(rate),
            "etaSeconds": round(left / rate, 1) if rate and self.state == "running" else None,
            "state": self.state,
            "errors": self.errors[-20:],
        }

    def fail(self, url: str, message: str) -> None:
        """Count ``url`` as failed, keeping ``message``."""
        self.failed += 1
        self.errors.append(f"{url}: {message}")


class WarmJobs:
    """The warm jobs of one admin listener: the last :data:`MAX_JOBS` kept, at most
    :data:`MAX_RUNNING_JOBS` running.

    Args:
      cache: the engine that warms.
      internal_error: called inside ``except`` with a description when a job meets an
        unexpected exception; it counts and logs it.
    """

    def __init__(self, cache: Cache, internal_error: Callable[[str], None]) -> None:
        self._cache = cache
        self._internal_error = internal_error
        self.jobs: dict[str, WarmJob] = {}
        self.running = 0

    def get(self, job_id: str) -> WarmJob | None:
        """The job named ``job_id``, if it is still remembered."""
        return self.jobs.get(job_id)

    def start(self, nursery: trio.Nursery, urls: list[str]) -> WarmJob:
        """Start a job in ``nursery`` (the admin listener's).

        Raises:
          BadRequest: 503 when :data:`MAX_RUNNING_JOBS` jobs are running already.
        """
        if self.running >= MAX_RUNNING_JOBS:
            raise BadRequest(
                f"{self.running} warm jobs are running already; try again later",
                status_hint=503,
            )
        job = WarmJob(os.urandom(6).hex(), list(urls))
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            del self.jobs[next(iter(self.jobs))]
        self.running += 1
        nursery.start_soon(self._run, job)
        return job

    async def _run(self, job: WarmJob) -> None:
        try:
            # sizes first (one discovery each), so that progress has a total in bytes
            sizes: dict[str, int] = {}
            for url in job.urls:
                try:
                    sizes[url] = (await self._cache.stat(url)).size
                    job.total_bytes += sizes[url]
                except McError as exc:
                    job.fail(url, str(exc))
                except Exception as exc:  # a bug must not take the admin nursery down
                    self._internal_error(f"warm {url[:200]!r}")
                    job.fail(url, f"internal error ({type(exc).__name__})")

            def progress(n: int) -> None:
                job.bytes += n

            for url in sizes:
                before = job.bytes
                try:
                    await self._cache.warm(url, progress)
                    job.done += 1
                except McError as exc:
                    job.fail(url, str(exc))
                    job.total_bytes -= sizes[url] - (job.bytes - before)
                except Exception as exc:  # a bug must not take the admin nursery down
                    self._internal_error(f"warm {url[:200]!r}")
                    job.fail(url, f"internal error ({type(exc).__name__})")
                    job.total_bytes -= sizes[url] - (job.bytes - before)
        finally:
            self.running -= 1
            job.ended = time.monotonic()
            job.state = "done"
