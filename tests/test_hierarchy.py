"""Parents and children: chains of mcc nodes on loopback, and falling back."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import trio

from fixtures.origin import Fault, Origin
from tests.helpers import Client, Node, free_port, get, run_node

DATA = os.urandom(600_000)


def _stored_blocks(node: Node, url: str) -> int:
    cache = node.cache
    meta = cache.index.get_object(cache.resolve(url))
    if meta is None:
        return 0
    return len(cache.index.get_blocks(meta.key, meta.version, 0, 10**6))


async def test_three_level_chain_stores_at_every_level(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    allow = [origin.authority]
    async with (
        run_node(tmp_path / "gp", allow_origins=allow, node_id="grandparent") as gp,
        run_node(tmp_path / "p", allow_origins=allow, node_id="parent", parents=[gp.url]) as p,
        run_node(tmp_path / "c", allow_origins=allow, node_id="child", parents=[p.url]) as c,
    ):
        url = origin.url("/f.bin")
        r = await get(c.port, url)
        assert r.status == 200 and r.body == DATA
        r = await get(c.port, url, [("range", "bytes=100000-300000")])
        assert r.body == DATA[100_000:300_001]
        for node in (gp, p, c):
            await node.cache.wait_idle()
        blocks = -(-len(DATA) // 65536)
        for node in (gp, p, c):
            assert _stored_blocks(node, url) == blocks, node.server.config.node_id
        # each block crossed the origin once, whatever the depth
        assert origin.count("/f.bin") <= blocks + 1
        # upstream requests carried the whole path in Via
        assert origin.requests[-1].headers.get("via") == "1.1 child, 1.1 parent, 1.1 grandparent"
        # a second child request is a hit at the child: nothing new upstream
        n = len(origin.requests)
        r = await get(c.port, url)
        assert r.header("cache-status") == "child; hit" and len(origin.requests) == n


async def test_chain_on_one_host_with_default_node_ids_stores_at_every_level(
    origin: Origin, tmp_path: Path
) -> None:
    """Regression: the default node id was the bare host name, so nodes on one host
    took each other's Via token for a forwarding loop (508) and the child went
    around them to the origin, storing at no parent."""
    origin.put("/f.bin", DATA)
    allow = [origin.authority]
    ports = [free_port() for _ in range(3)]

    def node(name: str, port: int, *parents: Node) -> Any:
        return run_node(
            tmp_path / name,
            allow_origins=allow,
            listen=[f"127.0.0.1:{port}"],
            node_id=None,
            parents=[p.url for p in parents],
        )

    async with (
        node("gp", ports[0]) as gp,
        node("p", ports[1], gp) as p,
        node("c", ports[2], p) as c,
    ):
        ids = {n.server.config.node_id for n in (gp, p, c)}
        host = socket.gethostname().split(".")[0]
        assert ids == {f"{host}:{port}" for port in ports}
        url = origin.url("/f.bin")
        r = await get(c.port, url)
        assert r.status == 200 and r.body == DATA
        for n in (gp, p, c):
            await n.cache.wait_idle()
        blocks = -(-len(DATA) // 65536)
        for n in (gp, p, c):
            assert _stored_blocks(n, url) == blocks, n.server.config.node_id
        assert origin.count("/f.bin") <= blocks + 1
        via = f"1.1 {host}:{ports[2]}, 1.1 {host}:{ports[1]}, 1.1 {host}:{ports[0]}"
        assert origin.requests[-1].headers.get("via") == via


async def test_dead_parent_is_skipped_for_the_next(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    allow = [origin.authority]
    dead = f"http://127.0.0.1:{free_port()}"
    async with (
        run_node(tmp_path / "p2", allow_origins=allow, node_id="p2") as p2,
        run_node(
            tmp_path / "c",
            allow_origins=allow,
            node_id="child",
            parents=[dead, p2.url],
            limits={"upstream_retries": 0},
        ) as c,
    ):
        r = await get(c.port, origin.url("/f.bin"))
        assert r.status == 200 and r.body == DATA
        health = c.cache.upstream.parent_health()
        assert health == {dead: False, p2.url: True}
        metrics = c.admin.render_metrics()
        assert f'mcc_parent_up{{parent="{dead}"}} 0' in metrics
        assert (await get(c.admin_port, "/summary", host=c.admin_authority)).body.count(
            b'"' + dead.encode()
        ) == 1


async def test_no_origin_fallback_fails_when_parents_are_down(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f.bin", DATA)
    dead = f"http://127.0.0.1:{free_port()}"
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        parents=[dead],
        origin_fallback=False,
        limits={"upstream_retries": 0},
    ) as c:
        r = await get(c.port, origin.url("/f.bin"))
        assert r.status == 502
        assert origin.count("/f.bin") == 0
    async with run_node(
        tmp_path / "c2",
        allow_origins=[origin.authority],
        parents=[dead],
        limits={"upstream_retries": 0},
    ) as c:
        r = await get(c.port, origin.url("/f.bin"))
        assert r.status == 200 and r.body == DATA  # fell back to the origin


async def test_killing_the_parent_mid_download_fails_no_client(
    origin: Origin, tmp_path: Path
) -> None:
    big = os.urandom(2 * 1024 * 1024)
    origin.put("/big.bin", big)
    origin.chunk_size = 32 * 1024
    origin.faults["/big.bin"] = Fault(body_delay=0.003)  # ~0.2 s for the whole body
    allow = [origin.authority]
    parent_scope = trio.CancelScope()
    parent_url: list[str] = []
    parent_up = trio.Event()

    async def run_parent() -> None:
        with parent_scope:
            async with run_node(tmp_path / "p", allow_origins=allow, node_id="parent") as p:
                parent_url.append(p.url)
                parent_up.set()
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_parent)
        await parent_up.wait()
        async with run_node(
            tmp_path / "c2",
            allow_origins=allow,
            node_id="child",
            parents=parent_url,
            readahead_blocks=2,
        ) as c:
            results: list[bytes] = []

            async def download() -> None:
                async with Client.connect(c.port) as cl:
                    results.append((await cl.request(origin.url("/big.bin"))).body)

            async with trio.open_nursery() as clients:
                for _ in range(3):
                    clients.start_soon(download)
                await origin.wait_request("/big.bin")
                await trio.sleep(0.05)
                parent_scope.cancel()  # the parent dies mid-transfer
            assert results == [big] * 3
            assert c.cache.upstream.parent_health()[parent_url[0]] is False


async def test_upstream_proxy_carries_all_upstream_traffic(origin: Origin, tmp_path: Path) -> None:
    origin.put("/f.bin", DATA)
    allow = [origin.authority]
    async with (
        run_node(tmp_path / "proxy", allow_origins=allow, node_id="proxy") as proxy,
        run_node(
            tmp_path / "c", allow_origins=allow, node_id="child", upstream_proxy=proxy.authority
        ) as c,
    ):
        r = await get(c.port, origin.url("/f.bin"), [("range", "bytes=5-10")])
        assert r.body == DATA[5:11]
        assert origin.requests[-1].headers.get("via") == "1.1 child, 1.1 proxy"
        assert all("proxy" in (rq.headers.get("via") or "") for rq in origin.requests)
