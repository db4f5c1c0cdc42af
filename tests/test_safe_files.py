"""Planted files: a symlink or file put into the cache directory by someone else is
never written through (nothing outside the cache changes) and never served."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import blake3
import pytest

import mcc
from fixtures.origin import Origin

BLOCK = 65536
DATA = os.urandom(3 * BLOCK + 123)
BLOCKS = [DATA[i : i + BLOCK] for i in range(0, len(DATA), BLOCK)]
DIGESTS = [blake3.blake3(b).hexdigest() for b in BLOCKS]


async def _read(cache: mcc.Cache, url: str) -> bytes:
    return b"".join([c async for c in cache.read(url, 0, None)])


def _opts(origin: Origin, cache_dir: Path) -> dict[str, Any]:
    return {"cache_dir": cache_dir, "allow_origins": [origin.authority], "block_size": "64KiB"}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["tmp", "blobs/xx", "blobs/xx/yy", "blob"])
async def test_planted_symlinks_are_never_written_through(
    origin: Origin, tmp_path: Path, where: str
) -> None:
    origin.put("/f", DATA)
    outside = tmp_path / "outside"
    outside.mkdir()
    bait = outside / "bait"
    bait.write_bytes(b"x" * BLOCK)
    cache_dir = tmp_path / "cache"
    async with mcc.open_cache(**_opts(origin, cache_dir)) as cache:
        first = cache.store.blobs.path(DIGESTS[0])
    if where == "tmp":
        os.rmdir(cache_dir / "tmp")
        os.symlink(outside, cache_dir / "tmp")
    elif where == "blobs/xx":
        first.parent.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(first.parent.parent)
        os.symlink(outside, first.parent.parent)
    elif where == "blobs/xx/yy":
        first.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(first.parent)
        os.symlink(outside, first.parent)
    else:
        first.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(bait, first)
    before = _snapshot(outside)
    async with mcc.open_cache(**_opts(origin, cache_dir)) as cache:
        assert await _read(cache, origin.url("/f")) == DATA
        await cache.wait_idle()
        for d in DIGESTS:
            assert not cache.store.blobs.path(d).is_symlink()
            assert cache.store.blobs.path(d).read_bytes() == BLOCKS[DIGESTS.index(d)]
    # nothing was created, changed or removed outside the cache
    assert _snapshot(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["bait"]


async def test_a_symlink_planted_over_a_stored_blob_is_never_served(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    cache_dir = tmp_path / "cache"
    async with mcc.open_cache(**_opts(origin, cache_dir)) as cache:
        assert await _read(cache, origin.url("/f")) == DATA
        await cache.wait_idle()
        stored = cache.store.blobs.path(DIGESTS[1])
    fetched = origin.count("/f")
    # the same length, other bytes: only the digest check or the link itself betrays it
    bait = tmp_path / "bait"
    bait.write_bytes(bytes(len(BLOCKS[1])))
    stored.unlink()
    os.symlink(bait, stored)
    for verify in ("never", "first"):
        async with mcc.open_cache(verify_on_read=verify, **_opts(origin, cache_dir)) as cache:
            assert await _read(cache, origin.url("/f")) == DATA
            await cache.wait_idle()
            assert not cache.store.blobs.path(DIGESTS[1]).is_symlink()
        if verify == "never":
            assert origin.count("/f") > fetched  # refetched, not read through the link
            os.unlink(stored)
            os.symlink(bait, stored)
    assert bait.read_bytes() == bytes(len(BLOCKS[1]))
