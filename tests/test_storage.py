"""Storage that survives: eviction, crashes, corruption, verify, ENOSPC, migrations."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import mcc
from fixtures.origin import Origin
from mcc.store.index import SCHEMA_VERSION, Index
from tests.helpers import free_port, get, run_node, serve_argv, tmpfs, wait_serving

B = 65536


async def _read(cache: mcc.Cache, url: str) -> bytes:
    return b"".join([c async for c in cache.read(url)])


async def test_eviction_keeps_the_drive_under_max_size_and_hot_objects(
    origin: Origin, tmp_path: Path
) -> None:
    max_size = 2 * 1024 * 1024
    objects = {f"/o{i}": os.urandom(150_000) for i in range(30)}
    for path, data in objects.items():
        origin.put(path, data)
    hot = os.urandom(150_000)
    origin.put("/hot", hot)
    async with mcc.open_cache(
        cache_dir=tmp_path,
        allow_origins=[origin.authority],
        block_size="64KiB",
        drives=[{"path": str(tmp_path), "max_size": max_size}],
    ) as cache:
        for path, data in objects.items():
            assert await _read(cache, origin.url(path)) == data
            assert await _read(cache, origin.url("/hot")) == hot  # keep it recently used
            await cache.wait_idle()
            await cache.evict()
            assert cache.index.stored_bytes_on(0) <= max_size
        on_disk = sum(p.stat().st_size for p in (tmp_path / "blobs").glob("*/*/*"))
        assert on_disk <= max_size
        assert cache.statistics().evictions > 0
        assert (await cache.stat(origin.url("/hot"))).cached
        last = list(objects)[-1]
        assert (await cache.stat(origin.url(last))).cached  # the most recent survives
        # evicted objects come back correctly
        assert await _read(cache, origin.url("/o0")) == objects["/o0"]


async def test_flipped_byte_is_detected_and_the_client_gets_right_bytes(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    origin.put("/f", data)
    url = origin.url("/f")
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        await node.cache.warm(url)
        meta = node.cache.index.get_object(node.cache.resolve(url))
        assert meta is not None
        digest = node.cache.index.get_blocks(meta.key, meta.version, 1, 1)[1]
        path = node.cache.blobs.path(digest)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0xFF
    path.write_bytes(bytes(raw))
    # restart: verify_on_read=first checks each blob on its first read after a start
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        r = await get(node.port, url, [("range", f"bytes={B}-{2 * B - 1}")])
        assert r.status == 206 and r.body == data[B : 2 * B]
        assert node.cache.statistics().corrupt_blocks == 1
        assert (node.cache.blobs.drives[0].root / "quarantine" / digest).exists()
        assert "mcc_corrupt_blocks_total 1" in node.admin.render_metrics()
        await node.cache.wait_idle()
        assert (await node.cache.stat(url)).cached  # refetched and stored again


def _found(stdout: str, what: str) -> int:
    """The number in ``mcc verify``'s table row ``what`` (e.g. ``corrupt (found)``)."""
    m = re.search(rf"^{re.escape(what)}\s+(\d+)\s*$", stdout, re.MULTILINE)
    assert m is not None, stdout
    return int(m.group(1))


def _run_verify(cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcc", "verify", "--cache-dir", str(cache_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_mcc_verify_finds_and_repairs_planted_problems(
    origin: Origin, tmp_path: Path
) -> None:
    for i in range(3):
        origin.put(f"/v{i}", os.urandom(150_000))
    cache_dir = tmp_path / "c"
    async with mcc.open_cache(
        cache_dir=cache_dir, allow_origins=[origin.authority], block_size="64KiB"
    ) as cache:
        for i in range(3):
            await cache.warm(origin.url(f"/v{i}"))
        digests = sorted(cache.index.all_digests())
        blobs = cache.blobs
    assert _run_verify(cache_dir).returncode == 0
    corrupt, missing = digests[0], digests[1]
    p = blobs.path(corrupt)
    p.write_bytes(b"X" + p.read_bytes()[1:])
    blobs.path(missing).unlink()
    orphan = blobs.put(b"nobody names me")
    (cache_dir / "tmp" / "half-written.1.1").write_bytes(b"half")
    r = _run_verify(cache_dir)
    assert r.returncode == 1
    for what in ("corrupt", "missing", "orphans", "temp files"):
        assert _found(r.stdout, f"{what} (found)") == 1, what
    r = _run_verify(cache_dir, "--repair")
    assert r.returncode == 0
    assert not blobs.exists(orphan) and not blobs.exists(corrupt)
    r = _run_verify(cache_dir)
    assert r.returncode == 0, r.stdout
    # and the cache still serves every object correctly afterwards
    async with mcc.open_cache(
        cache_dir=cache_dir, allow_origins=[origin.authority], block_size="64KiB"
    ) as cache:
        for i in range(3):
            assert await _read(cache, origin.url(f"/v{i}")) == origin.objects[f"/v{i}"].data


async def test_reconcile_after_crash_drops_and_reclaims(origin: Origin, tmp_path: Path) -> None:
    origin.put("/r", os.urandom(200_000))
    async with mcc.open_cache(
        cache_dir=tmp_path, allow_origins=[origin.authority], block_size="64KiB"
    ) as cache:
        await cache.warm(origin.url("/r"))
        digests = sorted(cache.index.all_digests())
        cache.blobs.path(digests[0]).unlink()  # a row without its blob
        orphan = cache.blobs.put(b"left behind by a crash")
        os.utime(cache.blobs.path(orphan), (1, 1))
    async with mcc.open_cache(
        cache_dir=tmp_path, allow_origins=[origin.authority], block_size="64KiB"
    ) as cache:
        await cache.wait_reconciled()
        assert await cache.reconcile() == (0, 0)  # the start already did it
        assert digests[0] not in cache.index.all_digests()
        assert not cache.blobs.exists(orphan)
        assert await _read(cache, origin.url("/r")) == origin.objects["/r"].data


def test_index_schema_1_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.executescript(
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE objects (key TEXT PRIMARY KEY, version TEXT NOT NULL, size INTEGER NOT NULL,
            etag TEXT, last_modified TEXT, content_type TEXT, headers TEXT NOT NULL,
            fetched_at REAL NOT NULL);
        CREATE TABLE blocks (key TEXT NOT NULL, version TEXT NOT NULL, idx INTEGER NOT NULL,
            digest TEXT NOT NULL, PRIMARY KEY (key, version, idx)) WITHOUT ROWID;
        CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
            last_access REAL NOT NULL, drive INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO objects VALUES ('http://h/x', 'e:"1"', 5, '"1"', NULL, NULL, '[]', 0);
        INSERT INTO blocks VALUES ('http://h/x', 'e:"1"', 0, 'ab');
        INSERT INTO blobs VALUES ('ab', 5, 0, 0);
        """
    )
    db.close()
    index = Index(tmp_path / "index.sqlite3")
    assert index.schema_version == SCHEMA_VERSION == 3
    assert index.get_blocks("http://h/x", 'e:"1"', 0, 0) == {0: "ab"}
    # schema 3: the record gained its fetch URL and block size (0: the directory's)
    record = index.get_object("http://h/x")
    assert record is not None and record.fetch_url is None and record.block_size == 0
    assert index.stored_bytes_on(0) == 5
    names = {r[0] for r in index._db.execute("SELECT name FROM sqlite_master")}
    assert "blobs_by_drive_access" in names
    index.close()
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.execute("UPDATE meta SET value='99' WHERE name='schema'")
    db.commit()
    db.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        Index(tmp_path / "index.sqlite3")


async def test_two_drives_share_blocks_and_find_them_after_restart(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(2_000_000)
    origin.put("/two", data)
    drives = [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}]
    async with mcc.open_cache(
        allow_origins=[origin.authority], block_size="64KiB", drives=drives
    ) as cache:
        await cache.warm(origin.url("/two"))
        usage = [cache.index.stored_bytes_on(i) for i in range(2)]
    assert all(u > 0 for u in usage) and sum(usage) == len(data)
    n = len(origin.requests)
    async with mcc.open_cache(
        allow_origins=[origin.authority], block_size="64KiB", drives=drives
    ) as cache:
        assert await _read(cache, origin.url("/two")) == data
    assert len(origin.requests) == n


async def test_disk_full_keeps_serving_unstored(origin: Origin, tmp_path: Path) -> None:
    async with tmpfs(tmp_path / "tiny", "1m") as mnt:
        data = os.urandom(3_000_000)
        origin.put("/big", data)
        async with run_node(
            mnt,
            allow_origins=[origin.authority],
            drives=[{"path": str(mnt), "max_size": "100MiB", "min_free": 0}],
        ) as node:
            for _ in range(2):
                resp = await get(node.port, origin.url("/big"))
                assert resp.status == 200 and resp.body == data
            await node.cache.wait_idle()
            assert node.cache.statistics().store_failures > 0
            assert "mcc_store_failures_total" in node.admin.render_metrics()
            assert not any((mnt / "tmp").iterdir())  # no half-written temp files left


async def test_sigkill_at_random_points_never_serves_a_wrong_byte(
    origin: Origin, tmp_path: Path
) -> None:
    rng = random.Random(42)
    objects = {f"/k{i}": os.urandom(rng.randrange(50_000, 400_000)) for i in range(12)}
    for path, data in objects.items():
        origin.put(path, data)
    origin.chunk_size = 16 * 1024
    cache_dir = tmp_path / "c"
    port = free_port()
    argv = serve_argv(port, cache_dir, origin.authority, "--block-size", "64KiB",
                      "--max-size", "2MiB", "--log-level", "warning")  # fmt: skip

    async def client(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(50):
            path = r.choice(list(objects))
            data = objects[path]
            a = r.randrange(len(data))
            b = r.randrange(a, len(data))
            try:
                resp = await get(port, origin.url(path), [("range", f"bytes={a}-{b}")])
            except Exception:
                return  # the server died under us: fine, as long as no byte was wrong
            if resp.status == 206:
                assert resp.body == data[a : b + 1], (path, a, b)

    for round_ in range(20):
        proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
        try:
            await wait_serving(port)
            async with trio.open_nursery() as nursery:
                for c in range(4):
                    nursery.start_soon(client, round_ * 10 + c)
                await trio.sleep(rng.uniform(0.05, 0.4))
                proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            await proc.wait()
    # a last clean start: everything reads back right, and verify finds nothing corrupt
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        await wait_serving(port)
        for path, data in objects.items():
            resp = await get(port, origin.url(path))
            assert resp.status == 200 and resp.body == data, path
    finally:
        proc.terminate()
        await proc.wait()
    r = _run_verify(cache_dir)
    assert _found(r.stdout, "corrupt (found)") == 0


async def test_min_free_floor_triggers_eviction(origin: Origin, tmp_path: Path) -> None:
    async with tmpfs(tmp_path / "small", "32m") as mnt:
        for i in range(10):
            origin.put(f"/m{i}", os.urandom(2_000_000))
        drives = [{"path": str(mnt), "max_size": "1GiB", "min_free": "12MiB"}]
        async with mcc.open_cache(
            allow_origins=[origin.authority], block_size="64KiB", drives=drives
        ) as cache:
            for i in range(10):
                await cache.warm(origin.url(f"/m{i}"))
                await cache.evict()
            free = cache.blobs.free_space(cache.blobs.drives[0])
            assert cache.statistics().evictions > 0
            assert free >= 10 * 1024 * 1024  # held near the floor, not filled up
            assert (await cache.stat(origin.url("/m9"))).cached  # the newest stays
