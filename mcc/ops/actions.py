"""The admin API's write actions besides warming: ``POST /purge`` and ``POST /verify``."""

from __future__ import annotations

from typing import Any

from ..engine.engine import Cache
from ..errors import BadRequest
from ..store.check import verify_live
from .guards import check_pattern, check_url
from .purge import PurgeTarget

__all__ = ["purge", "verify"]


async def purge(cache: Cache, doc: dict[str, Any]) -> dict[str, Any]:
    """Purge one URL (``url``), every object under a URL prefix (``prefix``), or
    every object whose host matches a pattern (``pattern``: host, host:port or
    *.suffix); see :mod:`mcc.ops.purge`.

    Args:
      cache: the engine.
      doc: the request's JSON body.

    Returns:
      ``{"purged": [the object keys removed]}``.

    Raises:
      BadRequest: 400 for a malformed target.
    """
    url, prefix, pattern = doc.get("url"), doc.get("prefix"), doc.get("pattern")
    if url is not None:
        url = check_url(url, "url")
        removed = [cache.resolve(url)] if await cache.purge(url) else []
        return {"purged": removed}
    if prefix is not None:
        text = check_url(prefix, "prefix")
    elif pattern is not None:
        text = check_pattern(pattern)
    else:
        raise BadRequest(
            'purge needs {"url": "http://..."}, {"prefix": "http://..."} or '
            '{"pattern": "host, host:port or *.suffix"}'
        )
    try:
        target = PurgeTarget.parse(text, cache.policy.canonical)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    removed = []
    for key in cache.store.object_keys():
        if target.matches(key):
            await cache.purge(key)
            removed.append(key)
    return {"purged": removed}


async def verify(cache: Cache, doc: dict[str, Any]) -> dict[str, Any]:
    """Check every blob of the running cache against its digest; with
    ``{"repair": true}``, corrupt blobs are quarantined at once (no longer served;
    their blocks are fetched again) and rows of missing blobs dropped.

    Returns:
      the ``mcc verify`` table as JSON: rows, and the clean, corrupt and missing counts.

    Raises:
      BadRequest: 400 when ``repair`` is not true or false.
    """
    repair = doc.get("repair", False)
    if not isinstance(repair, bool):
        raise BadRequest('verify takes {"repair": true} or {"repair": false}')
    report = await verify_live(cache.store, repair=repair)
    return {
        "rows": report.rows(),
        "clean": report.clean,
        "corrupt": report.corrupt,
        "missing": report.missing,
    }
