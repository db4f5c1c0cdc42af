"""The lean hit path (issue 17): a hit costs no worker-thread hop and no index
query or write; access times reach the index in batches, later."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fixtures.origin import Origin
from tests.helpers import Client, run_node

DATA = os.urandom(300_000)


class _CountingDb:
    """Stands in for the index's sqlite connection, counting statements."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.statements: list[str] = []

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.statements.append(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self.statements.append(sql)
        return self._db.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def test_hits_hop_to_no_thread_and_touch_no_index(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f.bin")
        await node.cache.warm(url)
        async with Client.connect(node.port) as c:
            assert (await c.request(url)).body == DATA  # first read: verify, caches warm
            hops: list[Callable[..., Any]] = []
            real = trio.to_thread.run_sync

            async def counting(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
                hops.append(fn)
                return await real(fn, *args, **kw)

            monkeypatch.setattr(trio.to_thread, "run_sync", counting)
            index = node.cache.store.index
            db = _CountingDb(index._db)
            monkeypatch.setattr(index, "_db", db)
            for i in range(20):
                start = (i * 13_001) % len(DATA)
                r = await c.request(url, [("range", f"bytes={start}-{start + 999}")])
                assert r.status == 206 and r.body == DATA[start : start + 1000]
                assert r.header("cache-status") == "node; hit"
        assert hops == []
        assert db.statements == []
