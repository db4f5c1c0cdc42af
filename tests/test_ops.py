"""Operations: metrics, summary, health, warm, purge, tokens, CLI tools, status page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from fixtures.origin import Fault, Origin
from tests.helpers import Node, admin_call, get, run_node, tmpfs

TOKEN = "0123456789abcdef-test-token"
DATA = os.urandom(200_000)


def _metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(node.admin.render_metrics()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _m(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def node(origin: Origin, tmp_path: Path) -> AsyncIterator[Node]:
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority], admin_token=TOKEN) as n:
        yield n


async def test_counters_follow_a_scripted_sequence(node: Node, origin: Origin) -> None:
    url = origin.url("/f.bin")
    m = _metrics(node)
    assert _m(m, "mcc_requests_total", cache="hit") == 0
    await get(node.port, url, [("range", "bytes=0-99")])  # miss
    await node.cache.wait_idle()
    await get(node.port, url, [("range", "bytes=0-99")])  # hit
    origin.put("/slow.bin", DATA)
    origin.faults["/slow.bin"] = Fault(head_delay=0.2)
    async with trio.open_nursery() as nursery:  # two at once: one fetch, one join
        for _ in range(2):
            nursery.start_soon(get, node.port, origin.url("/slow.bin"), [("range", "bytes=0-9")])
    await get(node.port, url, method="POST", body=b"x")  # pass
    await get(node.port, "http://not-allowed.example/")  # error (403)
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the 403's close finishes
    m = _metrics(node)
    assert _m(m, "mcc_requests_total", cache="miss") == 3
    assert _m(m, "mcc_requests_total", cache="hit") == 1
    assert _m(m, "mcc_requests_total", cache="pass") == 1
    assert _m(m, "mcc_requests_total", cache="error") == 1
    assert _m(m, "mcc_requests_total", cache="aborted") == 0
    assert _m(m, "mcc_flight_joins_total") == 1
    assert _m(m, "mcc_served_bytes_total", source="cache") == 100
    assert _m(m, "mcc_served_bytes_total", source="upstream") == 100 + 10 + 10 + len(b"echo:x")
    assert _m(m, "mcc_request_duration_seconds_count") == 6
    upstream = [v for (name, _), v in m.items() if name == "mcc_upstream_requests_total"]
    assert sum(upstream) == len(origin.requests)
    assert _m(m, "mcc_store_capacity_bytes", drive=str(node.cache.blobs.drives[0].root)) > 0
    assert _m(m, "mcc_open_connections") == 0
    # the summary agrees
    s = json.loads((await admin_call(node, "/summary")).body)
    assert s["sinceStart"]["hitBytes"] == 100 and s["sinceStart"]["hitRequests"] == 1
    assert s["last15s"]["hitBytes"] == 100
    assert s["hosts"][origin.authority] > 0


async def test_evictions_are_counted(origin: Origin, tmp_path: Path) -> None:
    for i in range(20):
        origin.put(f"/e{i}", os.urandom(100_000))
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        drives=[{"path": str(tmp_path / "c"), "max_size": "1MiB"}],
    ) as node:
        for i in range(20):
            await node.cache.warm(origin.url(f"/e{i}"))
        await node.cache.evict()
        m = _metrics(node)
        assert _m(m, "mcc_evictions_total") == node.cache.statistics().evictions > 0
        assert _m(m, "mcc_store_bytes", drive=str(tmp_path / "c")) <= 1024 * 1024


async def test_warm_then_hit_and_purge_then_miss(node: Node, origin: Origin) -> None:
    auth = [("authorization", f"Bearer {TOKEN}")]
    url = origin.url("/f.bin")
    r = await admin_call(node, "/warm", {"urls": [url]}, auth)
    assert r.status == 202
    job = json.loads(r.body)
    with trio.fail_after(10):
        while job["state"] != "done":
            await trio.sleep(0.02)
            job = json.loads((await admin_call(node, f"/warm/{job['id']}")).body)
    assert job["done"] == 1 and job["bytes"] == len(DATA)
    r = await get(node.port, url)
    assert r.header("cache-status") == "node; hit" and r.body == DATA
    r = await admin_call(node, "/purge", {"pattern": "127.0.0.1"}, auth)
    assert json.loads(r.body)["purged"] == [node.cache.resolve(url)]
    r = await get(node.port, url)
    assert r.header("cache-status") == "node; fwd=miss; stored" and r.body == DATA


async def test_write_endpoints_need_the_token(node: Node, origin: Origin) -> None:
    body = json.dumps({"url": origin.url("/f.bin")}).encode()
    for headers in ([], [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
        for path in ("/purge", "/warm"):
            r = await get(
                node.admin_port, path, headers, method="POST", body=body, host=node.admin_authority
            )
            assert r.status == 401, (path, headers)
            assert r.header("www-authenticate") == 'Bearer realm="mcc"'
    r = await get(
        node.admin_port,
        "/purge",
        [("authorization", f"Bearer {TOKEN}")],
        method="POST",
        body=body,
        host=node.admin_authority,
    )
    assert r.status == 200
    # reads on a loopback listener need no token
    assert (await admin_call(node, "/metrics")).status == 200


async def test_health_goes_503_when_a_drive_is_read_only(origin: Origin, tmp_path: Path) -> None:
    async with tmpfs(tmp_path / "ro", "4m") as mnt:
        # the index lives on the first drive; the second (read-only to be) holds only
        # blob files, which are closed after writing, so a remount read-only succeeds
        drives = [{"path": str(tmp_path / "a")}, {"path": str(mnt)}]
        async with run_node(
            tmp_path / "a", allow_origins=[origin.authority], drives=drives
        ) as node:
            r1 = await admin_call(node, "/health")
            assert r1.status == 200 and json.loads(r1.body)["ready"] is True
            await trio.run_process(["mount", "-o", "remount,ro", str(mnt)])
            r2 = await admin_call(node, "/health")
            assert r2.status == 503
            assert [d["writable"] for d in json.loads(r2.body)["drives"]] == [True, False]
            await trio.run_process(["mount", "-o", "remount,rw", str(mnt)])
            assert (await admin_call(node, "/health")).status == 200


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcc", *args], capture_output=True, text=True, timeout=60
    )


async def test_cli_stats_warm_purge(node: Node, origin: Origin) -> None:
    admin = ["--admin-listen", f"127.0.0.1:{node.admin_port}", "--admin-token", TOKEN]
    url = origin.url("/f.bin")
    r = await trio.to_thread.run_sync(lambda: _cli("warm", url, *admin))
    assert r.returncode == 0, r.stderr
    assert "warmed 1 of 1 objects" in r.stdout
    assert (await get(node.port, url)).header("cache-status") == "node; hit"
    r = await trio.to_thread.run_sync(lambda: _cli("stats", *admin))
    assert r.returncode == 0 and "hit ratio, bytes (since start)" in r.stdout
    assert "ready" in r.stdout and "yes" in r.stdout
    r = await trio.to_thread.run_sync(lambda: _cli("purge", url, *admin))
    assert r.returncode == 0 and "1 objects purged" in r.stdout
    r = await trio.to_thread.run_sync(
        lambda: _cli(
            "purge",
            url,
            "--admin-listen",
            f"127.0.0.1:{node.admin_port}",
            "--admin-token",
            "x" * 16,
        )
    )
    assert r.returncode == 1 and r.stderr.startswith("mcc: ") and "token" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_cli_reports_a_node_that_is_not_running() -> None:
    r = _cli("stats", "--admin-listen", "127.0.0.1:9")
    assert r.returncode == 1
    assert r.stderr.startswith("mcc: no mcc node answers") and "Traceback" not in r.stderr


async def test_status_page_renders_in_headless_chromium(
    node: Node, origin: Origin, tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    await get(node.port, origin.url("/f.bin"))
    argv = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=4000",
        "--dump-dom",
        f"http://127.0.0.1:{node.admin_port}/",
    ]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    dom = result.stdout.decode()
    console = [line for line in result.stderr.decode().splitlines() if "CONSOLE" in line]
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert console == [], console
    assert '<span id="node">node</span>' in dom  # filled in by the page's script
    assert origin.authority in dom  # the top hosts table
    assert '<span id="updated">last at' in dom  # the refresh succeeded
