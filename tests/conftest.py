"""Fixtures shared by the tests: a real test origin on loopback and a cache over it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

import mcc
from fixtures.origin import Origin


@pytest.fixture
async def origin(nursery: trio.Nursery) -> Origin:
    o = Origin()
    await nursery.start(o.serve)
    return o


@pytest.fixture
async def cache(origin: Origin, tmp_path: Path) -> AsyncIterator[mcc.Cache]:
    async with mcc.open_cache(
        cache_dir=tmp_path / "cache",
        allow_origins=[origin.authority],
        block_size="64KiB",
        node_id="test",
    ) as c:
        yield c
