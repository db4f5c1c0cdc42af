"""Durable commits (issue 22): a block the index calls stored survives a power loss.

A child process (tests/crash_child.py) fills a store, records each fsync, and dies at
a chosen step of a commit; :func:`power_loss` then cuts every file back to what was
synced. Reopened, the store must never hold an index row naming a short or missing
blob, and the start-up recovery must count what it repaired.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import subprocess
import sys
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fixtures.origin import Origin
from mcc.store.blobs import DriveInfo, digest_of
from mcc.store.records import ObjectMeta
from mcc.store.recovery import RecoveryCounts, judge
from mcc.store.store import Store
from tests.crash_child import CRASH_AT, CRASHED, KEY, B, block_data, power_loss
from tests.helpers import free_port, get, run_node, serve_argv, wait_serving

BLOCKS = 4


async def _crash(tmp_path: Path, step: str, *, durable: bool) -> Path:
    """Run the child to its crash and cut the power; returns the cache folder."""
    cache_dir, record = tmp_path / "cache", tmp_path / "fsyncs"
    argv = [sys.executable, "-m", "tests.crash_child", str(record), str(cache_dir), step]
    r = await trio.run_process(
        [*argv, str(BLOCKS), "1" if durable else "0"], check=False, capture_stderr=True
    )
    assert r.returncode == (0 if step == "none" else CRASHED), r.stderr.decode()
    power_loss(record, cache_dir)
    return cache_dir


def _open(cache_dir: Path) -> Store:
    return Store([DriveInfo(cache_dir, 10**9, 0)], block_size=B)


def _damaged_rows(store: Store) -> list[int]:
    """Block indexes whose row names a blob that is short, missing or wrong."""
    meta = store.get_object(KEY)
    if meta is None:
        return []
    rows = store.block_map(meta, 0, BLOCKS - 1)
    return [
        i
        for i, digest in rows.items()
        if store.blobs.size_of(digest) != B or not store.blobs.verify(digest)
    ]


# step -> (temp files, orphan blobs) the recovery finds after a crash at block CRASH_AT
CRASHES = {
    "written": (1, 0),  # temp file fsynced, never renamed
    "renamed": (0, 1),  # blob under its name, no index row
    "indexed": (0, 1),  # row inserted but its WAL never synced: lost with the power
    "none": (0, 0),
}


@pytest.mark.parametrize("step", list(CRASHES))
async def test_a_crash_at_any_commit_step_never_leaves_a_row_naming_a_short_blob(
    tmp_path: Path, step: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = await _crash(tmp_path, step, durable=True)
    store = _open(cache_dir)
    try:
        assert _damaged_rows(store) == []  # before any repair: the order alone did it
        with caplog.at_level(logging.INFO, logger="mcc.store"):
            await store.reconcile()
        temp, orphans = CRASHES[step]
        assert store.recovery == RecoveryCounts(temp, orphans, 0, 0)
        assert "start-up recovery: " + store.recovery.describe() in caplog.text
        # every block committed before the cut is stored, and right
        meta = store.get_object(KEY)
        assert meta is not None
        rows = store.block_map(meta, 0, BLOCKS - 1)
        committed = BLOCKS if step == "none" else CRASH_AT
        assert sorted(rows) == list(range(committed))
        for i, digest in rows.items():
            assert digest == digest_of(block_data(i))
            fd = await store.open_block(digest)
            assert fd is not None
            store.release(digest, fd)
        # nothing left over: no temp file, no blob without a row
        assert not list((cache_dir / "tmp").iterdir())
        assert {p.name for p in (cache_dir / "blobs").glob("*/*/*")} == set(rows.values())
    finally:
        store.close()


async def test_without_durability_a_power_loss_leaves_short_blobs_that_recovery_drops(
    tmp_path: Path,
) -> None:
    """The failure of issue 22, reproduced with durable = false (and so the test above
    can fail): rows checkpointed into the index name blobs whose bytes never reached
    the disk. Recovery drops exactly those rows."""
    cache_dir = await _crash(tmp_path, "renamed", durable=False)
    store = _open(cache_dir)
    try:
        assert _damaged_rows(store) == list(range(CRASH_AT))
        await store.reconcile()
        assert store.recovery == RecoveryCounts(0, 1, 0, CRASH_AT)
        assert _damaged_rows(store) == []
        meta = store.get_object(KEY)
        assert meta is not None and store.block_map(meta, 0, BLOCKS - 1) == {}
        assert not list((cache_dir / "blobs").glob("*/*/*"))
    finally:
        store.close()


async def test_group_commit_shares_one_flush_among_concurrent_blocks(tmp_path: Path) -> None:
    store = Store(
        [DriveInfo(tmp_path, 10**9, 0)], block_size=B, commit_interval=0.05, commit_batch=8
    )
    try:
        meta = ObjectMeta(KEY, "s:1", 16 * B, block_size=B)
        assert store.put_object(meta)

        async def one(i: int) -> None:
            writer = store.writer()
            writer.write(block_data(i))
            assert await store.commit(meta, i, writer)
            writer.close()

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
        assert store.commits.rows == 16
        assert store.commits.flushes < 16  # batched (8 at most per flush)
        assert store.commits.flushes >= 2
        assert len(store.block_map(meta, 0, 15)) == 16
    finally:
        store.close()


async def test_a_committer_cancelled_while_waiting_withdraws_its_row(tmp_path: Path) -> None:
    store = Store([DriveInfo(tmp_path, 10**9, 0)], block_size=B, commit_interval=0.05)
    try:
        meta = ObjectMeta(KEY, "s:1", 4 * B, block_size=B)
        assert store.put_object(meta)
        done: list[int] = []

        async def one(i: int) -> None:
            row = (KEY, "s:1", i, digest_of(block_data(i)), B, 0)
            assert await store.commits.commit(row, ()) == []
            done.append(i)

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, 0)  # leads (shielded)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(one, 1)  # follows, then is cancelled
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        assert done == [0]
        assert sorted(store.block_map(meta, 0, 3)) == [0]
        assert store.commits.rows == 1
    finally:
        store.close()


async def test_an_existing_blob_file_is_trusted_only_after_its_length_and_digest(
    tmp_path: Path,
) -> None:
    """A torn blob (the name reached the disk, the bytes did not) is rewritten."""
    store = _open(tmp_path)
    try:
        meta = ObjectMeta(KEY, "s:1", B, block_size=B)
        assert store.put_object(meta)
        digest = digest_of(block_data(0))
        torn = store.blobs.path(digest)
        torn.parent.mkdir(parents=True, exist_ok=True)
        torn.write_bytes(block_data(0)[: B // 2])
        assert await store.commit(meta, 0, block_data(0))
        assert torn.read_bytes() == block_data(0)
    finally:
        store.close()


_DIGESTS = st.sampled_from(["a", "b", "c", "d", "e"])


@given(
    indexed=st.dictionaries(_DIGESTS, st.integers(0, 3)),
    files=st.dictionaries(_DIGESTS, st.tuples(st.sampled_from([1.0, 5.0]), st.integers(0, 3))),
)
def test_judge_sorts_every_blob_into_exactly_one_state(
    indexed: dict[str, int], files: dict[str, tuple[float, int]]
) -> None:
    damage = judge(indexed, files, before=3.0)
    for d, size in indexed.items():
        assert (d in damage.missing) == (d not in files)
        assert (d in damage.short) == (d in files and files[d][1] != size)
        assert d not in damage.orphans
    for d, (mtime, _) in files.items():
        assert (d in damage.orphans) == (d not in indexed and mtime < 3.0)


async def test_recovery_counts_are_in_the_metrics(tmp_path: Path) -> None:
    cache_dir = await _crash(tmp_path, "written", durable=True)
    async with run_node(cache_dir) as node:
        await node.cache.wait_reconciled()
        text = node.admin.render_metrics()
    assert 'mcc_store_recovered{kind="temp_files"} 1.0' in text
    for kind in ("orphan_blobs", "missing_blobs", "short_blobs"):
        assert f'mcc_store_recovered{{kind="{kind}"}} 0.0' in text


async def test_a_node_cut_off_mid_fill_serves_every_committed_block_as_a_hit(
    origin: Origin, tmp_path: Path
) -> None:
    """Issue 22's power-loss run: a node fills objects for several clients, is killed
    (SIGKILL) mid-fill, and the file system drops whatever was not fsynced. Restarted,
    every block whose commit had ended is a hit, with no refetch and no corrupt blob."""
    objects = {f"/p{i}": random.Random(i).randbytes(6 * B + 1000) for i in range(8)}
    for path, data in objects.items():
        origin.put(path, data)
    cache_dir, record, committed = tmp_path / "c", tmp_path / "fsyncs", tmp_path / "committed"
    port = free_port()
    argv = [sys.executable, "-m", "tests.crash_child", "serve", str(record), str(committed)]
    argv += [*serve_argv(port, cache_dir, origin.authority, "--block-size", "64KiB")[3:]]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        await wait_serving(port)

        async def client(path: str) -> None:
            with contextlib.suppress(OSError, h11.ProtocolError):
                await get(port, origin.url(path))

        async with trio.open_nursery() as nursery:
            for path in objects:
                nursery.start_soon(client, path)
            for _ in range(400):  # until some blocks are committed (20 s at most)
                if committed.exists() and len(committed.read_text().splitlines()) >= 8:
                    break
                await trio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        await proc.wait()
    power_loss(record, cache_dir)
    lines = committed.read_text().splitlines()
    done = {(key, int(idx)) for key, idx in (line.split() for line in lines)}
    assert len(done) >= 8
    before = len(origin.requests)
    async with run_node(cache_dir, allow_origins=[origin.authority]) as node:
        await node.cache.wait_reconciled()
        assert node.cache.store.recovery.short_blobs == 0
        assert node.cache.store.recovery.missing_blobs == 0
        keys = {node.cache.resolve(origin.url(p)): p for p in objects}
        for key, idx in sorted(done):
            r = await get(
                node.port,
                origin.url(keys[key]),
                [("range", f"bytes={idx * B}-{(idx + 1) * B - 1}")],
            )
            assert r.header("cache-status") == "node; hit", (key, idx)
            assert r.body == objects[keys[key]][idx * B : (idx + 1) * B]
        assert len(origin.requests) == before  # no committed block was fetched again
        for path, data in objects.items():
            assert (await get(node.port, origin.url(path))).body == data
        assert node.cache.statistics().corrupt_blocks == 0
