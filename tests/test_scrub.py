"""Stored bytes stay trustworthy while running (issue 15): a blob that rots on disk
after its first check stops being served after the background scrub or a live
``mcc verify --repair``, and the block is fetched again.

What used to break: with ``verify_on_read = "first"`` a blob changed on disk after
its first read kept being served as a hit; ``mcc verify --repair`` beside a live
server quarantined it, but the server went on serving it from its open fd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from fixtures.origin import Origin
from mcc.engine import scrub as scrub_module
from tests.helpers import Node, admin_call, get, run_node

B = 65536
DATA = os.urandom(3 * B)


async def _stored_and_read(node: Node, url: str) -> Path:
    """Store the object, read block 1 once (its blob checked and its fd kept), then
    rot that blob in place; returns its path."""
    await node.cache.warm(url)
    r = await get(node.port, url, [("range", f"bytes={B}-{2 * B - 1}")])
    assert r.status == 206 and r.body == DATA[B : 2 * B]
    meta = node.cache.index.get_object(node.cache.resolve(url))
    assert meta is not None
    digest = node.cache.index.get_blocks(meta.key, meta.version, 1, 1)[1]
    path = node.cache.blobs.path(digest)
    _rot(path)
    return path


def _rot(path: Path) -> None:
    """Flip one byte in place: the same file (and inode) the node holds open."""
    with open(path, "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0xFF]))


async def _reads_right(node: Node, url: str) -> None:
    r = await get(node.port, url, [("range", f"bytes={B}-{2 * B - 1}")])
    assert r.status == 206 and r.body == DATA[B : 2 * B]
    await node.cache.wait_idle()
    assert (await node.cache.stat(url)).cached  # fetched again and stored


async def test_the_scrub_finds_a_blob_rotten_while_running(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    url = origin.url("/f")
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"scrub_rate": "16MiB"}
    ) as node:
        scrub = node.cache.scrub
        assert scrub is not None
        path = await _stored_and_read(node, url)
        for _ in range(400):  # up to 20 s
            if scrub.corrupt:
                break
            await trio.sleep(0.05)
        assert not path.exists()  # quarantined
        assert node.cache.statistics().corrupt_blocks == 1
        await _reads_right(node, url)


async def test_scrub_rate_0_turns_the_scrub_off(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f", DATA)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"scrub_rate": 0}
    ) as node:
        await node.cache.warm(origin.url("/f"))
        await trio.sleep(1.5)
        assert node.cache.scrub is not None and node.cache.scrub.checked_blobs == 0


async def test_verify_repair_on_a_running_node_stops_serving_a_rotten_blob_at_once(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f", DATA)
    url = origin.url("/f")
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"scrub_rate": 0}
    ) as node:
        path = await _stored_and_read(node, url)
        r = await admin_call(node, "/verify", {"repair": "yes"})
        assert r.status == 400
        # `mcc verify --repair` finds the cache locked by the node: it repairs through
        # the node's admin API
        argv = [
            sys.executable,
            "-m",
            "mcc",
            "verify",
            "--repair",
            "--cache-dir",
            str(tmp_path / "c"),
            "--admin-listen",
            f"127.0.0.1:{node.admin_port}",
        ]
        done = await trio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
        )
        assert done.returncode == 0, done.stderr
        assert "admin API" in done.stderr and "corrupt (repaired)" in done.stdout
        assert not path.exists()
        await _reads_right(node, url)


async def test_a_scrub_pass_reads_the_blob_list_in_pages(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass used to list every blob in one query on the event loop (a second with a
    million blobs); it now walks them in pages, each blob checked once."""
    origin.put("/f", DATA)
    origin.put("/g", DATA[::-1])
    monkeypatch.setattr(scrub_module, "_PAGE", 2)
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], limits={"scrub_rate": 0}
    ) as node:
        await node.cache.warm(origin.url("/f"))
        await node.cache.warm(origin.url("/g"))
        stored = node.cache.index.all_digests()
        assert len(stored) == 6
        pages: list[int] = []
        real = node.cache.index.digests_after

        def listing(after: str, limit: int) -> list[tuple[str, int]]:
            page = real(after, limit)
            pages.append(len(page))
            return page

        monkeypatch.setattr(node.cache.index, "digests_after", listing)
        scrub = scrub_module.Scrub(node.cache.store, lambda: 1 << 40)  # the node's is off
        assert await scrub.one_pass()
        assert pages == [2, 2, 2, 0]
        assert scrub.checked_blobs == 6 and scrub.checked_bytes == sum(stored.values())
