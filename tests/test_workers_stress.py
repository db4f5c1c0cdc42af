"""A bounded stress of ``mcc serve --workers 2`` with this round's cold path.

Concurrent cold whole GETs, ranges starting inside blocks, an origin that ignores
``Range`` (200 whole body), a PURGE mid-download followed by a new version at the
origin, PURGEs of an object while others hit it, and a worker killed mid-fill (its
fills taken over by the other). Every 200/206 body is checked byte for byte against what the origin
served (a 206 against the old or the new version, never a mix); a cut connection
is acceptable, a wrong byte or a hang is not, and the node must stay healthy.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import cast

import h11
import pytest
import trio

from fixtures.origin import Fault, Origin
from fixtures.raw_origin import RawOrigin, RawRequest, Reply
from tests.helpers import Response, get
from tests.test_workers import _node, _workers

B = 64 * 1024
ROUNDS = 3  # (round 0 all cold; then hits, purges and a kill beside cold reads)
KILL_IN = 1  # the round in which a worker is killed mid-fill
WITHIN = 60  # seconds the whole mix may take on a loaded machine (a hang fails)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CUT = (OSError, EOFError, trio.BrokenResourceError, h11.RemoteProtocolError)


def _check(resp: Response, versions: list[bytes], want: tuple[int, int] | None) -> None:
    """``resp`` carries bytes one of ``versions`` holds where it says they are (or is a
    clean error: the origin changed under a read)."""
    assert resp.status in (200, 206, 502, 503, 504), (resp.status, resp.body[:200])
    if resp.status >= 500:
        return
    if resp.status == 200:
        assert any(resp.body == v for v in versions), "a 200 body no version has"
        return
    found = _CONTENT_RANGE.match(resp.header("content-range") or "")
    assert found is not None, resp.headers
    first, last, size = (int(g) for g in found.groups())
    if want is not None:
        assert (first, min(last, size - 1)) == (want[0], min(want[1], size - 1))
    assert len(resp.body) == last - first + 1
    assert any(len(v) == size and resp.body == v[first : last + 1] for v in versions), (
        f"a 206 body ({first}-{last}) no version has"
    )


async def test_a_mix_over_two_workers_serves_only_bytes_the_origin_sent(
    origin: Origin, tmp_path: Path
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"seed {seed}")  # (shown with a failure: the ranges and timings to replay)
    ranged = os.urandom(10 * B + 4321)
    whole = os.urandom(5 * B + 99)  # the origin ignores Range for it
    changing = os.urandom(8 * B + 7)  # purged mid-download, then changed at the origin
    inside_only = os.urandom(12 * B + 555)  # read cold by ranges starting inside blocks
    origin.put("/ranged.bin", ranged)
    origin.put("/inside.bin", inside_only)
    origin.put("/whole.bin", whole)
    origin.put("/changing.bin", changing)
    origin.chunk_size = 16 * 1024
    origin.faults["/ranged.bin"] = Fault(body_delay=0.002)
    origin.faults["/inside.bin"] = Fault(body_delay=0.002)
    origin.faults["/whole.bin"] = Fault(ignore_range=True, body_delay=0.002)
    origin.faults["/changing.bin"] = Fault(body_delay=0.004)
    versions = {
        "/ranged.bin": [ranged],
        "/whole.bin": [whole],
        "/changing.bin": [changing],
        "/inside.bin": [inside_only],
    }
    outcomes: list[str] = []

    async with _node(tmp_path, origin) as (proc, port, admin):

        async def read(path: str, span: tuple[int, int] | None) -> None:
            headers = [] if span is None else [("range", f"bytes={span[0]}-{span[1]}")]
            try:
                resp = await get(port, origin.url(path), headers)
            except _CUT:
                outcomes.append("cut")
                return
            _check(resp, versions[path], span)
            outcomes.append(str(resp.status))

        def inside(path: str) -> tuple[int, int]:
            size = len(versions[path][0])
            first = rng.randrange(size - 1) // B * B + rng.randrange(1, B)  # inside a block
            first = min(first, size - 2)
            return first, min(size - 1, first + rng.randrange(1, 3 * B))

        async def purge(path: str, nursery: trio.Nursery, change: bool) -> None:
            await trio.sleep(rng.uniform(0.01, 0.1))
            for _ in range(3):  # (a PURGE that went to the killed worker is cut)
                try:
                    resp = await get(port, origin.url(path), method="PURGE")
                except _CUT:
                    continue
                assert resp.status in (200, 404), resp.status
                break
            if change:  # a new version at the origin, as long as the old one
                data = os.urandom(len(versions[path][0]))
                versions[path].append(data)
                origin.put(path, data)
            for _ in range(3):
                nursery.start_soon(read, path, None)
                nursery.start_soon(read, path, inside(path))

        async def kill_a_worker() -> None:
            await trio.sleep(rng.uniform(0.01, 0.1))
            os.kill(min(_workers(proc.pid)), signal.SIGKILL)  # (the master restarts it)

        for round_ in range(ROUNDS):  # round 2 on: hits beside the cold reads
            with trio.fail_after(WITHIN):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(purge, "/changing.bin", nursery, True)
                    if round_:
                        nursery.start_soon(purge, "/ranged.bin", nursery, False)
                    if round_ == KILL_IN:
                        nursery.start_soon(kill_a_worker)
                    for _ in range(5):
                        for path in versions:
                            if path != "/inside.bin":
                                nursery.start_soon(read, path, None)
                            nursery.start_soon(read, path, inside(path))
        assert len(outcomes) == ROUNDS * (5 * 7 + 6) + (ROUNDS - 1) * 6, seed
        # (a kill cuts the connections of its worker: most still get an answer to check)
        assert sum(o in ("cut", "502", "503", "504") for o in outcomes) <= len(outcomes) // 2, (
            seed,
            outcomes,
        )

        # the node stays healthy: every object reads back whole (the last version of
        # the changed one), on both workers (several fresh connections)
        versions["/changing.bin"] = versions["/changing.bin"][-1:]
        with trio.fail_after(WITHIN):
            for _ in range(4):
                assert (await get(admin, "/health", host=f"127.0.0.1:{admin}")).status == 200
                for path in versions:
                    resp = await get(port, origin.url(path))
                    _check(resp, versions[path], None)
        assert proc.returncode is None
    assert proc.returncode == 0
    assert "Traceback" not in (tmp_path / "stderr").read_text()


def _chunked_blocks(data: bytes, runs_long: bool) -> Callable[[RawRequest], Reply]:
    """An origin that frames every range it answers as chunked (no Content-Length, so
    its blocks are vouched for only at the body's end), 5 bytes too many when
    ``runs_long``; a request without Range gets the whole object, framed by length."""

    def respond(head: RawRequest) -> Reply:
        common = b'etag: "c1"\r\ncache-control: max-age=600\r\n'
        found = _RANGE.match(head.headers.get("range", b"").decode())
        if found is None:
            return Reply([b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n\r\n%s" % (
                common, len(data), data)])  # fmt: skip
        first = int(found.group(1))
        last = min(int(found.group(2) or len(data) - 1), len(data) - 1)
        framing = b"content-range: bytes %d-%d/%d\r\n" % (first, last, len(data))
        framing += b"transfer-encoding: chunked\r\n\r\n"
        pieces = [b"HTTP/1.1 206 Partial Content\r\n" + common + framing]
        for at in range(first, last + 1, 16 * 1024):
            piece = data[at : min(at + 16 * 1024, last + 1)]
            pieces.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        if runs_long:
            pieces.append(b"5\r\nXXXXX\r\n")
        return Reply([*pieces, b"0\r\n\r\n"], gap=0.003)

    return respond


@pytest.mark.parametrize("runs_long", [True, False])
async def test_chunked_block_answers_over_two_workers_are_served_only_once_vouched(
    tmp_path: Path, nursery: trio.Nursery, runs_long: bool
) -> None:
    """Blocks of a body not framed by Content-Length, followed by the other worker:
    a body that runs long at its end is served to no reader whole, in either worker."""
    data = os.urandom(12 * B + 7)
    origin = RawOrigin(_chunked_blocks(data, runs_long))
    await nursery.start(origin.serve)
    served: list[int] = []
    # (_node reads only the origin's authority)
    async with _node(tmp_path, cast(Origin, origin)) as (_, port, _admin):

        async def read(span: tuple[int, int] | None) -> None:
            headers = [] if span is None else [("range", f"bytes={span[0]}-{span[1]}")]
            try:
                resp = await get(port, origin.url("/c.bin"), headers)
            except _CUT:
                return
            _check(resp, [data], span)
            served.append(resp.status)

        with trio.fail_after(WITHIN):
            async with trio.open_nursery() as readers:
                for i in range(8):
                    readers.start_soon(read, None)
                    readers.start_soon(read, (i * B + 100, i * B + 2 * B))
    assert served == [] if runs_long else sorted(served) == [200] * 8 + [206] * 8
