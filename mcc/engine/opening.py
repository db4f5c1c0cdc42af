"""Opening a cache: the config with its overrides, the drives' lock, and the store,
upstream and engine started in one nursery and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..config import Config, Drive, load_config, with_overrides
from ..store.blobs import DriveInfo
from ..store.lock import lock_drives
from ..store.shared import SharedStore
from ..store.store import Store
from ..upstream.client import Upstream
from .engine import Cache
from .scrub import Scrub

__all__ = ["drive_infos", "open_cache", "open_shared_cache"]


def drive_infos(drives: tuple[Drive, ...]) -> list[DriveInfo]:
    """The store's view of the configured drives."""
    return [DriveInfo(Path(d.path), d.max_size, d.min_free) for d in drives]


@asynccontextmanager
async def open_cache(config: Config | None = None, **overrides: Any) -> AsyncIterator[Cache]:
    """Open a cache for use as a library.

    Args:
      config: a full :class:`~mcc.config.Config`; or None for the defaults.
      **overrides: config keys to change (``block_size=``, ``allow_origins=`` ...), as
        in the file; the ``timeouts``, ``limits`` and ``freshness`` tables are merged key
        by key. ``cache_dir=`` is short for one drive at that folder (``drives=`` wins).

    Yields:
      The :class:`Cache`; its fetches stop when the block exits.

    Raises:
      ConfigError: a bad override, one line per problem.
    """
    cache_dir = overrides.pop("cache_dir", None)
    if cache_dir is not None:  # an explicit drives= wins
        overrides.setdefault("drives", [{"path": str(cache_dir)}])
    if config is None:
        config = load_config(overrides=overrides)
    else:
        config = with_overrides(config, overrides)
    # one process per cache directory (raises CacheLocked naming the holder's PID)
    with lock_drives(Path(d.path) for d in config.drives):
        async with _opened(config) as cache:
            yield cache


@asynccontextmanager
async def open_shared_cache(config: Config, *, recover: bool) -> AsyncIterator[Cache]:
    """Open a cache as one worker of a node (``--workers``): on a
    :class:`~mcc.store.shared.SharedStore`, without taking the drives' lock (the
    master holds it for every worker).

    Args:
      config: the node's config.
      recover: reconcile index and blob files at start (the first worker only).
    """
    async with _opened(config, shared=True, recover=recover) as cache:
        yield cache


@asynccontextmanager
async def _opened(
    config: Config, *, shared: bool = False, recover: bool = True
) -> AsyncIterator[Cache]:
    kind = SharedStore if shared else Store
    store = kind(
        drive_infos(config.drives),
        block_size=config.block_size,
        verify_on_read=config.verify_on_read,
        durable=config.durable,
        commit_interval=config.commit_interval,
        commit_batch=config.commit_batch,
    )
    if isinstance(store, SharedStore):
        store.recover = recover
    upstream = Upstream(config)
    try:
        async with trio.open_nursery() as nursery:
            cache = Cache(config, nursery, store=store, upstream=upstream)
            nursery.start_soon(store.run_maintenance)
            cache.scrub = Scrub(store, lambda: cache.config.limits.scrub_rate)
            nursery.start_soon(cache.scrub.run)
            nursery.start_soon(upstream.peers.run)
            try:
                yield cache
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
        store.close()
