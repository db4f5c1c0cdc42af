"""Three nodes behind a real HAProxy: what the origin sees, what each node serves.

    python -m benchmarks.cluster

Runs, on loopback, the deployments of the README's "Several nodes" (the same
helpers as ``tests/test_cluster.py``) and prints one JSON object per scenario:

- ``uri``: ``balance uri whole``, no peers; 12 objects of 3 blocks, 4 ranged reads of
  each at once; then one node is killed and everything read again.
- ``roundrobin-peers`` and ``roundrobin-alone``: ``balance roundrobin`` with and
  without ``--peer``; one 24 MiB object read as 1 MiB ranges by 48 clients at once,
  twice; then one node is killed and it is read once more.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from fixtures.origin import Origin
from mcc.upstream.peers import owner
from tests.helpers import get
from tests.test_cluster import MiB, cluster, haproxy

BLOCKS = 24


async def _uri(tmp: Path, origin: Origin) -> dict[str, Any]:
    objects = {f"/o{i}.bin": os.urandom(3 * MiB) for i in range(12)}
    for path, data in objects.items():
        origin.put(path, data)
    reads = [(0, MiB - 1), (MiB, 2 * MiB - 1), (2 * MiB, 3 * MiB - 1), (MiB // 2, MiB + 99)]
    wrong = 0

    async def read(path: str, start: int, end: int) -> None:
        nonlocal wrong
        headers = [("range", f"bytes={start}-{end}")]
        r = await get(lb.port, origin.url(path), headers, host=origin.authority)
        wrong += r.body != objects[path][start : end + 1]

    async def wave() -> None:
        async with trio.open_nursery() as nursery:
            for path in objects:
                for start, end in reads:
                    nursery.start_soon(read, path, start, end)

    async with (
        cluster(tmp, origin, peers=False) as members,
        haproxy(tmp, members, "uri whole") as lb,
    ):
        t0 = time.monotonic()
        await wave()
        cold = time.monotonic() - t0
        first = len(origin.requests)
        held = {m.name: len(m.node.cache.index.object_keys()) for m in members}
        victim = max(members, key=lambda m: held[m.name])
        await victim.kill()
        await lb.wait_status({f"mcc{members.index(victim) + 1}": "DOWN"})
        await wave()
        return {
            "scenario": "uri",
            "originRequests": first,
            "objectsPerNode": held,
            "refetchesAfterKill": len(origin.requests) - first,
            "victimShareBlocks": 3 * held[victim.name],
            "wrongResponses": wrong,
            "coldSeconds": round(cold, 2),
        }


async def _round_robin(tmp: Path, origin: Origin, peers: bool) -> dict[str, Any]:
    data = os.urandom(BLOCKS * MiB)
    origin.put("/hot.iso", data)
    url = origin.url("/hot.iso")
    wrong = 0

    async def read(block: int) -> None:
        nonlocal wrong
        r = await get(
            lb.port,
            url,
            [("range", f"bytes={block * MiB}-{(block + 1) * MiB - 1}")],
            host=origin.authority,
        )
        wrong += r.body != data[block * MiB : (block + 1) * MiB]

    async def wave() -> float:
        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(2 * BLOCKS):
                nursery.start_soon(read, i % BLOCKS)
        return time.monotonic() - t0

    async with (
        cluster(tmp, origin, peers=peers) as members,
        haproxy(tmp, members, "roundrobin") as lb,
    ):
        waves = [await wave(), await wave()]
        sent = {s: int(row["bout"]) for s, row in (await lb.stats()).items()}
        total = sum(sent.values())
        first = origin.count("/hot.iso")
        victim = members[1]
        owned = sum(owner([m.name for m in members], url, b) == victim.name for b in range(BLOCKS))
        await victim.kill()
        await lb.wait_status({"mcc2": "DOWN"})
        waves.append(await wave())
        ranges = Counter(rq.headers["range"] for rq in origin.requests[:first])
        return {
            "scenario": "roundrobin-peers" if peers else "roundrobin-alone",
            "originRequests": first,
            "mostRequestsForOneBlock": max(ranges.values()),
            "nodeShareOfBytes": {s: round(n / total, 3) for s, n in sent.items()},
            "peerBytes": sum(m.node.cache.upstream.peers.served_bytes for m in members),
            "victimOwnedBlocks": owned,
            "refetchesAfterKill": origin.count("/hot.iso") - first,
            "wrongResponses": wrong,
            "waveSeconds": [round(w, 2) for w in waves],
        }


async def main() -> None:
    for scenario in ("uri", "roundrobin-peers", "roundrobin-alone"):
        with tempfile.TemporaryDirectory() as tmp:
            origin = Origin()
            async with trio.open_nursery() as nursery:
                await nursery.start(origin.serve)
                if scenario == "uri":
                    result = await _uri(Path(tmp), origin)
                else:
                    result = await _round_robin(Path(tmp), origin, scenario.endswith("peers"))
                print(json.dumps(result))
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
