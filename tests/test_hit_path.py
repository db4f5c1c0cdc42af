"""The lean hit path (issue 17): a hit costs no worker-thread hop and no index
query or write; access times reach the index in batches, later, off the loop; and
the upkeep around hits (access times, eviction, the scrub) never holds the loop long."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fixtures.origin import Origin
from mcc.errors import BadRequest
from mcc.http.routing import OwnNames, Route, RouteMemo, route_request
from mcc.http.sendfile import raw_socket
from mcc.store.blobs import DriveInfo
from mcc.store.index import Index
from mcc.store.records import ObjectMeta
from mcc.store.store import Store
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


async def test_access_times_are_written_off_the_loop_on_their_own_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The access times hits note used to be written by the event loop, on the main
    connection, in one transaction: tens of ms with thousands of blobs touched."""
    index = Index(tmp_path / "index.sqlite3")
    try:
        index.put_object(ObjectMeta(key="k", version="v", size=30))
        for i, d in enumerate(("a", "b", "c")):
            index.add_block("k", "v", i, d, 10)
        t0 = time.time() + 1000  # later than the rows' own times
        index.touch({"a"}, when=t0 + 2)
        index.touch({"b"}, when=t0 + 1)
        db = _CountingDb(index._db)
        monkeypatch.setattr(index, "_db", db)
        loop_thread = threading.get_ident()
        threads: list[int] = []

        def write(pending: dict[str, float]) -> None:
            threads.append(threading.get_ident())
            Index.write_touches(index, pending)

        await trio.to_thread.run_sync(write, index.take_touches())
        assert threads and threads != [loop_thread]
        assert db.statements == []  # the loop's connection was not used
        assert [d for d, _ in index.lru_digests(0, 3)] == ["c", "b", "a"]
        # an older time (written late) never moves a blob back in the LRU order
        await trio.to_thread.run_sync(index.write_touches, {"a": t0 - 500})
        assert [d for d, _ in index.lru_digests(0, 3)] == ["c", "b", "a"]
    finally:
        monkeypatch.undo()
        index.close()


async def test_store_writes_access_times_through_a_worker_thread(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f.bin")
        await node.cache.warm(url)
        async with Client.connect(node.port) as c:
            assert (await c.request(url)).body == DATA
        store = node.cache.store
        index = store.index
        db = _CountingDb(index._db)
        monkeypatch.setattr(index, "_db", db)
        written: list[tuple[int, dict[str, float]]] = []
        real = index.write_touches

        def recording(pending: dict[str, float]) -> None:
            written.append((threading.get_ident(), dict(pending)))
            real(pending)

        monkeypatch.setattr(index, "write_touches", recording)
        await store.write_touches()
        assert len(written) == 1
        thread, pending = written[0]
        assert thread != threading.get_ident()
        assert set(pending) == set(index.all_digests())  # every block read was noted
        assert db.statements == ["SELECT digest, size FROM blobs"]  # (all_digests above)
        await store.write_touches()  # nothing new noted: no hop at all
        assert len(written) == 1


def test_startup_objects_are_frozen_and_later_garbage_still_collected() -> None:
    code = (
        "import gc\n"
        "from mcc.memory import freeze_startup_objects\n"
        "keep = [[] for _ in range(1000)]\n"
        "freeze_startup_objects()\n"
        "assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()\n"
        "a = []; a.append(a); del a\n"
        "assert gc.collect() >= 1\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_hits_arm_no_timeout_while_the_socket_takes_their_bytes(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each send of a hit used to enter a trio.fail_after scope (its send timeout),
    about 14 us on this machine; now a timeout is armed only when a send must wait
    for room, and a slow reader is still cut off (test_server covers that)."""
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        url = origin.url("/f.bin")
        await node.cache.warm(url)
        async with Client.connect(node.port) as c:
            assert (await c.request(url)).body == DATA
            armed: list[str] = []
            for name in ("fail_after", "fail_at", "move_on_after", "move_on_at"):
                real = getattr(trio, name)

                def counting(*args: Any, _real: Any = real, _name: str = name) -> Any:
                    armed.append(_name)
                    return _real(*args)

                monkeypatch.setattr(trio, name, counting)
            for i in range(20):
                start = (i * 13_001) % len(DATA)
                r = await c.request(url, [("range", f"bytes={start}-{start + 9_999}")])
                assert r.status == 206 and r.body == DATA[start : start + 10_000]
            r = await c.request(url)
            assert r.status == 200 and r.body == DATA
        assert armed == []


_OWN = OwnNames(frozenset({"cache.local", "127.0.0.1"}), frozenset({8080}))
_TARGETS = st.one_of(
    st.sampled_from(["/", "/a?cacheHostOrigin=o.example", "http://o.example/x", "*", "/x"]),
    st.text(alphabet="/?=&:ahtpsx.oO", max_size=30),
)
_HOSTS = st.one_of(st.none(), st.sampled_from(["cache.local:8080", "o.example", "127.0.0.1"]))


@given(
    calls=st.lists(
        st.tuples(_TARGETS, _HOSTS, st.sampled_from([None, "http://mirror"])), max_size=30
    )
)
def test_route_memo_answers_as_route_request(
    calls: list[tuple[str, str | None, str | None]],
) -> None:
    """The server memoises routes (a hit repeats its target): the memo must give what
    route_request gives, refusals included, as long as it is cleared when the config
    it was filled under changes (each origin here gets its memo)."""
    memos = {origin: RouteMemo() for origin in (None, "http://mirror")}
    for target, host, origin in calls:
        try:
            expected: Route | str = route_request(target, host, _OWN, origin)
        except BadRequest as exc:
            expected = str(exc)
        try:
            got: Route | str = memos[origin].route(target, host, _OWN, origin)
        except BadRequest as exc:
            got = str(exc)
        assert got == expected


async def test_a_reload_routes_anew(origin: Origin, tmp_path: Path) -> None:
    """A memoised route must not outlive the reload that changes the origin."""
    other = Origin()
    async with trio.open_nursery() as nursery:
        await nursery.start(other.serve)
        origin.put("/f.bin", b"first origin")
        other.put("/f.bin", b"second origin")
        async with (
            run_node(
                tmp_path / "c",
                origin=f"http://{origin.authority}",
                allow_origins=[origin.authority, other.authority],
            ) as node,
            Client.connect(node.port) as c,
        ):
            own = f"127.0.0.1:{node.port}"  # the node's own name: the reverse-proxy form
            assert (await c.request("/f.bin", host=own)).body == b"first origin"
            node.server.reconfigure(
                attrs.evolve(node.server.config, origin=f"http://{other.authority}")
            )
            assert (await c.request("/f.bin", host=own)).body == b"second origin"
        nursery.cancel_scope.cancel()


async def test_a_large_eviction_lets_the_loop_run_between_its_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eviction drops each blob's rows in a transaction of its own, on the loop: 256
    in a row held it for tens of ms. It now yields every _EVICT_YIELD of them."""
    store = Store([DriveInfo(tmp_path / "d", 20_000, 0)], block_size=1000, durable=False)
    try:
        store.put_object(ObjectMeta(key="k", version="v", size=100_000, block_size=1000))
        for i in range(100):
            store.index.add_block("k", "v", i, store.blobs.put(os.urandom(1000)), 1000)
        ticks = 0
        at_drop: list[int] = []
        real = store.index.drop_digest

        def dropping(digest: str, **kw: Any) -> list[tuple[str, str, int]]:
            at_drop.append(ticks)
            return real(digest, **kw)

        monkeypatch.setattr(store.index, "drop_digest", dropping)
        done = trio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await trio.lowlevel.checkpoint()
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            evicted = await store.evict()
            done.set()
        assert evicted == len(at_drop) >= 80
        # the other task ran between the drops, again and again (trio's random batch
        # order may run the eviction a few times in a row: no exact count)
        assert len(set(at_drop)) >= evicted // 32
    finally:
        monkeypatch.undo()
        store.close()


def test_a_loop_write_waits_for_the_access_time_writer(tmp_path: Path) -> None:
    """The access times' own connection commits while the loop's connection may be in
    a transaction that read first: that transaction then failed at once ("database is
    locked", seen evicting while access times were written). Loop writes now take the
    write lock first, waiting for the other writer."""
    path = tmp_path / "index.sqlite3"
    index = Index(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        index.put_object(ObjectMeta(key="k", version="v", size=20))
        index.add_block("k", "v", 0, "a", 10)
        index.add_block("k", "v", 1, "b", 10)
        other.execute("BEGIN IMMEDIATE")  # the writer holds the lock, and commits later
        other.execute("UPDATE blobs SET last_access=1")
        commit = threading.Timer(0.3, other.execute, ("COMMIT",))
        commit.start()
        assert index.drop_digest("a") == [("k", "v", 0)]
        commit.join()
        assert index.all_digests() == {"b": 10}
    finally:
        other.close()
        index.close()


async def test_the_raw_socket_under_trios_is_found() -> None:
    """The hit path's reads and writes skip trio's wrappers through the socket trio
    keeps (a private attribute): if a trio release renames it, hits still work through
    trio, only slower; this says so."""
    with trio.socket.socket() as sock:
        raw = raw_socket(sock)
        assert isinstance(raw, socket.socket) and raw.fileno() == sock.fileno()
        assert not raw.getblocking()  # trio's: the fast path relies on EAGAIN
