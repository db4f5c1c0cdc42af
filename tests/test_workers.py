"""``mcc serve --workers 2``: two processes serving as one node (issue 17 item 1).

A real master and its workers over real sockets, against the test origin: one
upstream request per block whichever worker gets the readers, counters summed
across the workers, and a worker killed with SIGKILL in the middle of fills:
restarted by the master, no wrong byte served, none lost from the store.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import trio

from fixtures.origin import Fault, Origin
from tests.helpers import Response, free_port, get, wait_serving

B = 64 * 1024
READERS = 40
WITHIN = 60  # seconds any one step may take on a loaded machine


@asynccontextmanager
async def _node(
    tmp_path: Path, origin: Origin, *extra: str
) -> AsyncIterator[tuple[trio.Process, int, int]]:
    """A two-worker node on loopback; yields (master process, port, admin port)."""
    port, admin = free_port(), free_port()
    argv = [
        sys.executable, "-m", "mcc", "serve", "--workers", "2",
        "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
        "--cache-dir", str(tmp_path / "c"), "--allow-origin", origin.authority,
        "--access-log", "", "--block-size", "64KiB", "--node-id", "w2", *extra,
    ]  # fmt: skip
    with (tmp_path / "stderr").open("ab") as err:
        proc = await trio.lowlevel.open_process(argv, stderr=err)
    try:
        await wait_serving(port)
        await wait_serving(admin)
        yield proc, port, admin
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(WITHIN) as waited:
                await proc.wait()
            if waited.cancelled_caught:
                proc.kill()
                await proc.wait()


def _workers(master: int) -> set[int]:
    """The master's children (its workers) now."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{master}/task"):
        with open(f"/proc/{master}/task/{task}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


async def _until_published(admin: int, requests: int) -> dict[str, Any]:
    """The admin's /summary once the workers' counters add up to ``requests``."""
    with trio.fail_after(WITHIN):
        while True:
            got = await get(admin, "/summary", host=f"127.0.0.1:{admin}")
            assert got.status == 200
            doc: dict[str, Any] = json.loads(got.body)
            if sum(doc["workerRequests"]) >= requests:
                assert sum(doc["workerRequests"]) == requests, doc["workerRequests"]
                return doc
            await trio.sleep(0.05)


async def _read_all(port: int, url: str, n: int) -> list[Response]:
    """``n`` concurrent GETs of ``url``, each on its own connection."""
    out: list[Response] = []

    async def one() -> None:
        out.append(await get(port, url))

    with trio.fail_after(WITHIN):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return out


async def test_forty_cold_readers_over_two_workers_cost_one_request_per_block_and_one_count(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(8 * B + 1000)
    origin.put("/big.bin", data)
    origin.chunk_size = 16 * 1024
    origin.faults["/big.bin"] = Fault(body_delay=0.005)  # fills overlap the readers
    async with _node(tmp_path, origin) as (proc, port, admin):
        base = await _until_published(admin, 1)  # the /health asked by _node
        got = await _read_all(port, origin.url("/big.bin"), READERS)
        assert [r.status for r in got] == [200] * READERS
        assert all(r.body == data for r in got)
        blocks = -(-len(data) // B)
        ranges = [r.headers.get("range") for r in origin.requests]
        assert origin.count("/big.bin") == blocks, ranges
        # counters: both workers served some, the node totals are the sum
        doc = await _until_published(admin, READERS + 1)
        counts = zip(doc["workerRequests"], base["workerRequests"], strict=True)
        per_worker = [n - b for n, b in counts]
        assert len(per_worker) == 2 and min(per_worker) > 0, per_worker
        since, was = doc["sinceStart"], base["sinceStart"]
        assert since["missRequests"] - was["missRequests"] == READERS
        assert doc["egressBytes"] - base["egressBytes"] == READERS * len(data)
        assert doc["upstreamBytes"] == len(data)
        metrics = (await get(admin, "/metrics", host=f"127.0.0.1:{admin}")).body.decode()
        served = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("mcc_requests_total{")
        ]
        assert sum(served) == READERS + 1, metrics  # and the /health of _node
        # SIGHUP to the master reaches every worker, and the node goes on serving
        proc.send_signal(signal.SIGHUP)
        with trio.fail_after(WITHIN):  # (the workers are other processes: polled)
            for _ in range(WITHIN * 20):
                if (tmp_path / "stderr").read_text().count("got SIGHUP") == 2:
                    break
                await trio.sleep(0.05)
        assert (tmp_path / "stderr").read_text().count("got SIGHUP") == 2
        assert (await get(port, origin.url("/big.bin"))).body == data
    # both workers wrote the one index: never refused as locked (a deferred
    # transaction upgraded to a write used to fail at once with "database is locked")
    assert "could not" not in (tmp_path / "stderr").read_text()


async def test_a_worker_killed_during_fills_is_restarted_and_no_byte_is_wrong(
    origin: Origin, tmp_path: Path
) -> None:
    objects = {f"/o{i}.bin": os.urandom(6 * B + 17 * i) for i in range(4)}
    for path, data in objects.items():
        origin.put(path, data)
        origin.faults[path] = Fault(body_delay=0.01)
    origin.chunk_size = 8 * 1024  # ~0.1 s per block: the kill lands mid-fill
    async with _node(tmp_path, origin) as (proc, port, _):
        before = _workers(proc.pid)
        assert len(before) == 2
        results: list[tuple[str, Response | Exception]] = []

        async def read(path: str) -> None:
            try:
                results.append((path, await get(port, origin.url(path))))
            except (OSError, EOFError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
                results.append((path, exc))  # a clean error: the connection broke

        with trio.fail_after(WITHIN):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    for path in objects:
                        nursery.start_soon(read, path)
                await origin.wait_request("/o3.bin")
                await trio.sleep(0.2)
                os.kill(min(before), signal.SIGKILL)  # (reaped and replaced below)
        assert len(results) == 4 * len(objects)
        for path, outcome in results:
            if isinstance(outcome, Response):
                assert outcome.status in (200, 502, 503, 504), outcome.status
                if outcome.status == 200:  # a body cut short raises instead
                    assert outcome.body == objects[path]
        killed = min(before)
        with trio.fail_after(WITHIN):  # (the master is another process: polled)
            for _ in range(WITHIN * 20):
                after = _workers(proc.pid)
                if killed not in after and len(after) == 2:
                    break
                await trio.sleep(0.05)
        assert killed not in after and max(before) in after and len(after) == 2
        # everything reads back right, and then it is all stored: a second read of
        # every object costs no upstream request
        for path, data in objects.items():
            got = await _read_all(port, origin.url(path), 2)
            assert [r.body == data for r in got] == [True, True], path
        asked = len(origin.requests)
        with trio.fail_after(WITHIN):  # (the last blocks read may still be committing)
            for path, data in objects.items():
                while True:
                    got = await _read_all(port, origin.url(path), 2)
                    assert [r.body == data for r in got] == [True, True], path
                    if all("; hit" in (r.header("cache-status") or "") for r in got):
                        break
                    await trio.sleep(0.05)
        again = [(r.target, r.headers.get("range")) for r in origin.requests[asked:]]
        assert again == []
        assert proc.returncode is None  # the master went on
    assert proc.returncode == 0  # and drained both workers on SIGTERM
