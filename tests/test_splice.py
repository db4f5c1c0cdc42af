"""Splicing plain-HTTP bodies framed by Content-Length from the upstream socket into
block files (mcc.upstream.splice, mcc.engine.splicing): every byte of such a body
takes that path, lands at its offset, and is stored and served right; a file that
cannot be written leaves nothing behind in the pipe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from fixtures.origin import Origin
from mcc.upstream.connection import RECEIVE_SIZE
from mcc.upstream.splice import FileWriteError, Splicer
from tests.helpers import get, run_node

KiB = 1024


async def test_a_splicer_moves_at_most_what_it_is_asked_to_its_offset(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    data = os.urandom(300 * KiB)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with a, b, Splicer() as splicer:
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    view = memoryview(data)
                    while view:
                        view = view[await a.send(view) :]
                    a.shutdown(trio.socket.SHUT_WR)

                nursery.start_soon(send)
                moved = 0
                for _ in range(10_000):
                    n = await splicer.move(b, fd, 1000 + moved, 7777)
                    assert 0 <= n <= 7777
                    if not n:
                        break
                    moved += n
            assert moved == len(data)
            assert os.pread(fd, len(data) + 10, 1000) == data
    finally:
        os.close(fd)


async def test_a_splice_is_a_checkpoint_even_when_the_bytes_are_there(tmp_path: Path) -> None:
    # (a body that had all arrived was moved in one go, every other task waiting:
    # a reader of the block got its first byte only once the whole block was in)
    a, b = trio.socket.socketpair()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with a, b, Splicer() as splicer:
            await a.send(b"z" * 5000)
            with trio.testing.assert_checkpoints():
                assert await splicer.move(b, fd, 0, 1000) == 1000
    finally:
        os.close(fd)


async def test_a_file_that_cannot_be_written_leaves_the_pipe_empty(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    (tmp_path / "ro").write_bytes(b"")
    ro = os.open(tmp_path / "ro", os.O_RDONLY)
    rw = os.open(tmp_path / "rw", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with a, b, Splicer() as splicer:
            await a.send(b"x" * 1000)
            with pytest.raises(FileWriteError):
                await splicer.move(b, ro, 0, 1000)
            await a.send(b"y" * 10)
            assert await splicer.move(b, rw, 0, 100) == 10
            assert os.pread(rw, 100, 0) == b"y" * 10  # nothing of the failed call
    finally:
        os.close(ro)
        os.close(rw)


async def test_a_plain_http_body_is_spliced_and_stored_right(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = {"/f": os.urandom(40 * 64 * KiB + 123), "/g": os.urandom(12 * 64 * KiB)}
    for path, data in objects.items():
        origin.put(path, data)
    spliced = 0
    move = Splicer.move

    async def counting(self: Splicer, *args: object) -> int:
        nonlocal spliced
        n = await move(self, *args)  # type: ignore[arg-type]
        spliced += n
        return n

    monkeypatch.setattr(Splicer, "move", counting)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        r = await get(node.port, origin.url("/f"))
        assert r.status == 200 and r.body == objects["/f"]
        first = 5 * 64 * KiB + 40_000  # and a range split in two fetches (engine.spans)
        r = await get(node.port, origin.url("/g"), [("range", f"bytes={first}-")])
        assert r.status == 206 and r.body == objects["/g"][first:]
        await node.cache.wait_idle()
        fetched = len(objects["/f"]) + len(objects["/g"]) - 5 * 64 * KiB
        assert origin.body_bytes == fetched
        # every byte but those read with a response's head (at most one receive each)
        assert fetched - len(origin.requests) * RECEIVE_SIZE <= spliced <= fetched
        assert spliced >= fetched // 2
        n = len(origin.requests)
        for path, data in objects.items():  # from the store: the digests held
            r = await get(node.port, origin.url(path), [("range", f"bytes={5 * 64 * KiB}-")])
            assert r.status == 206 and r.body == data[5 * 64 * KiB :]
        assert len(origin.requests) == n
