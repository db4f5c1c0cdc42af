"""Several nodes: block ownership among peers, and a real HAProxy in front of 3 nodes.

The HAProxy tests fill ``fixtures/haproxy.cfg`` with loopback ports, start haproxy,
and read its stats socket for what each node sent; they skip where haproxy is missing
(``.ci/run`` installs it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fixtures.origin import Origin
from mcc.upstream.peers import owner
from tests.helpers import Node, free_port, get, run_node

TEMPLATE = Path(__file__).parent.parent / "fixtures" / "haproxy.cfg"
MiB = 1024 * 1024


# -- ownership -------------------------------------------------------------------------


@given(
    st.sets(st.text("abcdefgh-0123456789", min_size=1, max_size=8), min_size=2, max_size=8),
    st.data(),
)
def test_removing_a_peer_only_moves_its_blocks(members: set[str], data: st.DataObject) -> None:
    names = sorted(members)
    gone = data.draw(st.sampled_from(names))
    rest = [m for m in names if m != gone]
    for block in range(64):
        before = owner(names, "http://o.test/f.bin", block)
        after = owner(rest, "http://o.test/f.bin", block)
        assert after == before or before == gone
        assert after in rest


def test_ownership_spreads_blocks_and_ignores_member_order() -> None:
    members = ["edge-1", "edge-2", "edge-3"]
    owners = Counter(owner(members, "http://o.test/big.iso", b) for b in range(3000))
    assert all(900 < n < 1100 for n in owners.values()), owners
    assert all(
        owner(members, "http://o.test/big.iso", b)
        == owner(members[::-1], "http://o.test/big.iso", b)
        for b in range(100)
    )


# -- a cluster on loopback ---------------------------------------------------------------


@attrs.define
class Member:
    """A node of a test cluster that the test can kill."""

    node: Node
    name: str
    scope: trio.CancelScope
    stopped: trio.Event

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def _member(
    path: Path, port: int, name: str, overrides: dict[str, Any], *, task_status: Any
) -> None:
    scope, stopped = trio.CancelScope(), trio.Event()
    try:
        with scope:
            async with run_node(
                path, listen=[f"127.0.0.1:{port}"], node_id=name, **overrides
            ) as node:
                task_status.started(Member(node, name, scope, stopped))
                await trio.sleep_forever()
    finally:
        stopped.set()


@asynccontextmanager
async def cluster(
    tmp_path: Path, origin: Origin, *, peers: bool, count: int = 3, **overrides: Any
) -> AsyncIterator[list[Member]]:
    """``count`` nodes on fresh loopback ports, each listing all (itself too) as peers."""
    ports = [free_port() for _ in range(count)]
    overrides.setdefault("block_size", "1MiB")
    overrides.setdefault("allow_origins", [origin.authority])
    overrides["peers"] = [f"http://127.0.0.1:{p}" for p in ports] if peers else []
    async with trio.open_nursery() as nursery:
        members: list[Member] = [
            await nursery.start(_member, tmp_path / f"n{i}", port, f"n{i}", overrides)
            for i, port in enumerate(ports)
        ]
        if peers:
            with trio.fail_after(10):
                for m in members:
                    await m.node.cache.upstream.peers.wait_members(count)
        try:
            yield members
        finally:
            nursery.cancel_scope.cancel()


def _range(block: int, size: int = MiB) -> list[tuple[str, str]]:
    return [("range", f"bytes={block * size}-{block * size + size - 1}")]


def _owner_of(members: list[Member], url: str, block: int) -> str:
    return owner([m.name for m in members], url, block)


async def test_each_block_crosses_the_origin_once_from_its_owner(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(12 * 65536)
    origin.put("/f.bin", data)
    url = origin.url("/f.bin")
    async with cluster(tmp_path, origin, peers=True, block_size="64KiB") as members:
        # every node reads every block, the three at once
        async with trio.open_nursery() as nursery:
            for m in members:
                for b in range(12):
                    nursery.start_soon(get, m.node.port, url, _range(b, 65536))
        for m in members:
            r = await get(m.node.port, url)
            assert r.body == data
        for m in members:  # blocks are stored (durably) after their bytes went out
            await m.node.cache.wait_idle()
        assert origin.count("/f.bin") == 12
        for rq in origin.requests:
            block = int(rq.headers["range"].split("=")[1].split("-")[0]) // 65536
            # the node that asked the origin is the block's owner (last Via entry)
            assert rq.headers["via"].split()[-1] == _owner_of(members, url, block)
        # a non-owner stored what it fetched from the owner: the next read is a hit
        for m in members:
            r = await get(m.node.port, url, _range(5, 65536))
            assert r.header("cache-status") == f"{m.name}; hit"
        served = sum(m.node.cache.upstream.peers.served_bytes for m in members)
        received = sum(m.node.cache.upstream.peers.received_bytes for m in members)
        assert served == received > 0


async def test_a_peer_request_is_never_forwarded_to_another_peer(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(8 * 65536)
    origin.put("/f.bin", data)
    url = origin.url("/f.bin")
    async with cluster(tmp_path, origin, peers=True, block_size="64KiB") as members:
        first = members[0]
        block = next(b for b in range(8) if _owner_of(members, url, b) != first.name)
        marked = [*_range(block, 65536), ("x-mcc-peer", "n9")]
        r = await get(first.node.port, url, marked)
        assert r.body == data[block * 65536 : (block + 1) * 65536]
        # n0 went to the origin itself, though another node owns the block
        assert [rq.headers["via"] for rq in origin.requests] == ["1.1 n0"]
        assert [m.node.cache.upstream.peers.served_bytes for m in members] == [65536, 0, 0]


async def test_a_node_listing_itself_recognises_itself(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", b"x" * 1000)
    port = free_port()
    async with run_node(
        tmp_path / "solo",
        listen=[f"127.0.0.1:{port}"],
        node_id="solo",
        allow_origins=[origin.authority],
        # once by its listen address, once by a name it learns is its own from /health
        peers=[f"http://127.0.0.1:{port}", f"http://localhost:{port}"],
    ) as node:
        peers = node.cache.upstream.peers
        with trio.fail_after(5):
            while not all(p.is_self for p in peers.peers):
                await peers.wait_changed()
        assert peers.members() == ["solo"] and not peers.active
        r = await get(node.port, origin.url("/f.bin"))
        assert r.status == 200 and origin.requests[-1].headers["via"] == "1.1 solo"


async def test_a_dead_owner_hands_its_blocks_to_the_next(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(16 * 65536)
    origin.put("/f.bin", data)
    url = origin.url("/f.bin")
    async with cluster(tmp_path, origin, peers=True, block_size="64KiB") as members:
        victim = members[2]
        # read through the victim: the others store the blocks they own, it stores all
        assert (await get(victim.node.port, url)).body == data
        owned = [b for b in range(16) if _owner_of(members, url, b) == victim.name]
        await victim.kill()
        before = origin.count("/f.bin")
        async with trio.open_nursery() as nursery:
            for m in members[:2]:
                nursery.start_soon(get, m.node.port, url)
        for m in members[:2]:
            assert (await get(m.node.port, url)).body == data
            assert m.node.cache.upstream.peers.health()[victim.node.url]["up"] is False
        # the victim's blocks went to their next owners, and from there to the origin
        # once each; every other block stayed where it was
        assert 0 < origin.count("/f.bin") - before <= len(owned)
        assert max(Counter(rq.headers["range"] for rq in origin.requests).values()) <= 2


async def test_cluster_summary_and_stats_add_up_the_nodes(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(8 * 65536)
    origin.put("/f.bin", data)
    url = origin.url("/f.bin")
    async with cluster(tmp_path, origin, peers=True, block_size="64KiB") as members:
        for m in members:
            assert (await get(m.node.port, url)).body == data
        for m in members:  # a fetch's bytes are counted when it ends, after its commits
            await m.node.cache.wait_idle()
        doc = json.loads(
            (
                await get(
                    members[0].node.admin_port,
                    "/summary?cluster=1",
                    host=members[0].node.admin_authority,
                )
            ).body
        )
        assert (doc["answered"], doc["unreachable"]) == (3, 0)
        assert sorted(n["nodeId"] for n in doc["nodes"]) == ["n0", "n1", "n2"]
        # what clients got, and what crossed the origin link once for all of them
        assert doc["clientBytes"] == 3 * len(data), doc
        assert doc["originBytes"] == len(data), doc
        assert doc["peerBytes"] > 0 and doc["hitRatioBytes"] == round(2 / 3, 4)

        def stats() -> subprocess.CompletedProcess[str]:
            admin = f"127.0.0.1:{members[0].node.admin_port}"
            argv = [sys.executable, "-m", "mcc", "stats", "--peers", "--admin-listen", admin]
            return subprocess.run(argv, capture_output=True, text=True, timeout=30)

        r = await trio.to_thread.run_sync(stats)
        assert r.returncode == 0, r.stderr
        assert "cluster (3 of 3 nodes)" in r.stdout and "66.7 %" in r.stdout
        await members[2].kill()
        r = await trio.to_thread.run_sync(stats)
        assert r.returncode == 1 and "UNREACHABLE" in r.stdout
        assert "cluster (2 of 3 nodes)" in r.stdout


# -- HAProxy in front ---------------------------------------------------------------------


@attrs.define
class Balancer:
    port: int
    socket: Path

    async def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: server name -> column -> value."""
        stream = await trio.open_unix_socket(str(self.socket))
        async with stream:
            await stream.send_all(b"show stat\n")
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
        rows = csv.DictReader(io.StringIO(out.decode().lstrip("# ")))
        return {
            r["svname"]: r for r in rows if r["pxname"] == "mcc_nodes" and r["svname"][:3] == "mcc"
        }

    async def wait_status(self, want: dict[str, str], within: float = 15) -> None:
        with trio.fail_after(within):
            while True:
                stats = await self.stats()
                if all(stats[s]["status"] == v for s, v in want.items()):
                    return
                await trio.sleep(0.1)


@asynccontextmanager
async def haproxy(tmp_path: Path, members: list[Member], balance: str) -> AsyncIterator[Balancer]:
    """A real HAProxy on a loopback port in front of ``members`` (three of them)."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    port, sock = free_port(), tmp_path / "haproxy.sock"
    cfg = TEMPLATE.read_text().format(
        bind=f"127.0.0.1:{port}",
        balance=balance,
        stats_socket=sock,
        **{f"node{i + 1}": m.node.authority for i, m in enumerate(members)},
    )
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = await trio.lowlevel.open_process(
        [exe, "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # a few lines: notices, servers going up and down
    )
    try:
        balancer = Balancer(port, sock)
        with trio.fail_after(15):
            while not sock.exists():
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    raise AssertionError((await proc.stderr.receive_some(65536)).decode())
                await trio.sleep(0.05)
        await balancer.wait_status({f"mcc{i + 1}": "UP" for i in range(len(members))})
        yield balancer
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        proc.kill()


async def test_haproxy_uri_balance_without_peers(origin: Origin, tmp_path: Path) -> None:
    objects = {f"/o{i}.bin": os.urandom(3 * MiB) for i in range(12)}
    for path, data in objects.items():
        origin.put(path, data)
    async with (
        cluster(tmp_path, origin, peers=False) as members,
        haproxy(tmp_path, members, "uri whole") as lb,
    ):
        wrong = 0

        async def read(path: str, start: int, end: int) -> None:
            nonlocal wrong
            headers = [("range", f"bytes={start}-{end}")]
            r = await get(lb.port, origin.url(path), headers, host=origin.authority)
            wrong += r.status != 206 or r.body != objects[path][start : end + 1]

        # four ranged reads of each object, all at once: each block, and one across two
        reads = [(0, MiB - 1), (MiB, 2 * MiB - 1), (2 * MiB, 3 * MiB - 1), (MiB // 2, MiB + 99)]
        async with trio.open_nursery() as nursery:
            for path in objects:
                for start, end in reads:
                    nursery.start_soon(read, path, start, end)
        assert wrong == 0
        # each object lives on one node: no byte crossed the origin twice (a read
        # starting inside a block may fetch its block in two requests, mcc.engine.spans)
        assert origin.body_bytes == sum(len(d) for d in objects.values())
        held = {m.name: set(m.node.cache.index.object_keys()) for m in members}
        assert sum(len(keys) for keys in held.values()) == 12

        victim = max(members, key=lambda m: len(held[m.name]))
        await victim.kill()
        await lb.wait_status({f"mcc{members.index(victim) + 1}": "DOWN"})
        before = origin.body_bytes
        async with trio.open_nursery() as nursery:
            for path in objects:
                for start, end in reads:
                    nursery.start_soon(read, path, start, end)
        assert wrong == 0
        # only the lost node's objects were fetched again
        assert origin.body_bytes - before <= 3 * MiB * len(held[victim.name])


async def test_haproxy_round_robin_with_peers_spreads_a_hot_object(
    origin: Origin, tmp_path: Path
) -> None:
    blocks = 24
    data = os.urandom(blocks * MiB)
    origin.put("/hot.iso", data)
    url = origin.url("/hot.iso")
    async with (
        cluster(tmp_path, origin, peers=True) as members,
        haproxy(tmp_path, members, "roundrobin") as lb,
    ):
        wrong = 0

        async def read(block: int) -> None:
            nonlocal wrong
            # (HAProxy refuses a proxy-form request whose Host names another authority)
            r = await get(lb.port, url, _range(block), host=origin.authority)
            wrong += r.status != 206 or r.body != data[block * MiB : (block + 1) * MiB]

        async def wave() -> None:
            # 48 clients at once, two on every 1 MiB range
            async with trio.open_nursery() as nursery:
                for i in range(2 * blocks):
                    nursery.start_soon(read, i % blocks)

        before = {s: int(row["bout"]) for s, row in (await lb.stats()).items()}
        await wave()
        await wave()
        assert wrong == 0
        # the whole cluster asked the origin once per block
        assert origin.count("/hot.iso") == blocks
        assert sorted(Counter(rq.headers["range"] for rq in origin.requests).values()) == [1] * 24
        # every node served its part of the hot object
        sent = {s: int(row["bout"]) - before[s] for s, row in (await lb.stats()).items()}
        total = sum(sent.values())
        assert total >= 2 * blocks * MiB
        for server, n in sent.items():
            assert 0.20 <= n / total <= 0.47, (server, sent)

        victim = members[1]
        owned = [b for b in range(blocks) if _owner_of(members, url, b) == victim.name]
        await victim.kill()
        await lb.wait_status({"mcc2": "DOWN"})
        await wave()
        assert wrong == 0
        # losing a node costs at most the blocks it owned
        assert origin.count("/hot.iso") - blocks <= len(owned)
