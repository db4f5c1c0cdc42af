"""No request can kill the node: the admin API, the internal-address check, metric labels."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from fixtures.origin import Origin
from mcc.errors import McError
from mcc.ops.client import ADMIN_HEADER
from mcc.ops.metrics import _MAX_TRACKED_URLS, MAX_HOST_LABELS, OTHER, Metrics, fold_tail
from mcc.ops.warm import MAX_RUNNING_JOBS
from mcc.origins import OriginPolicy, is_internal_address
from tests.helpers import Node, Response, admin_call, get, raw_exchange, run_node


@pytest.mark.parametrize(
    ("address", "internal"),
    [
        # regressions: these three were taken for global addresses
        ("2002::1", True),  # 6to4
        ("2002:a00:1::1", True),  # 6to4 wrapping 10.0.0.1
        ("100.64.0.1", True),  # shared address space (carrier-grade NAT)
        ("100.127.255.254", True),
        ("fec0::1", True),  # site-local
        # IPv4 wrapped in IPv6 is judged by the IPv4 address
        ("::ffff:10.0.0.1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:8.8.8.8", False),
        ("64:ff9b::a00:1", True),  # NAT64 of 10.0.0.1
        ("64:ff9b::808:808", False),  # NAT64 of 8.8.8.8
        # the usual suspects
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("0.0.0.0", True),
        ("224.0.0.1", True),  # multicast
        ("240.0.0.1", True),  # reserved
        ("198.18.0.1", True),  # benchmarking
        ("192.0.2.1", True),  # documentation
        ("::1", True),
        ("::", True),
        ("fc00::1", True),  # unique-local
        ("fe80::1%eth0", True),  # link-local with a zone
        ("ff02::1", True),  # multicast
        ("2001:db8::1", True),  # documentation
        ("2001::1", True),  # Teredo
        ("::10.0.0.1", True),  # IPv4-compatible (deprecated)
        ("not an address", True),
        # global
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("2606:4700:4700::1111", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_is_internal_address(address: str, internal: bool) -> None:
    assert is_internal_address(address) is internal


# -- bounded metric labels -------------------------------------------------------------


def test_host_labels_stay_bounded_however_many_hosts_arrive() -> None:
    """Regression: every Host ever seen kept its own entry (120k hosts, +17.6 MB)."""
    metrics = Metrics(OriginPolicy.build(["*.example.com"]))

    def flood(first: int, n: int) -> None:
        for i in range(first, first + n):
            metrics.record("miss", 10, 0.01, f"h{i}.example.com", f"http://h{i}.example.com/f")
            metrics.record("error", 1, 0.01, f"evil{i}.test", f"http://evil{i}.test/")

    tracemalloc.start()
    try:
        flood(0, 5_000)
        before = tracemalloc.get_traced_memory()[0]
        flood(5_000, 20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(metrics.bytes_by_host) == MAX_HOST_LABELS + 1
    assert "h0.example.com" in metrics.bytes_by_host  # the first ones keep their entry
    assert not any(h.startswith("evil") for h in metrics.bytes_by_host)  # off the allowlist
    assert sum(metrics.bytes_by_host.values()) == 25_000 * 11  # nothing lost, only folded
    assert metrics.bytes_by_host[OTHER] == 25_000 * 11 - MAX_HOST_LABELS * 10
    assert len(metrics.bytes_by_url) <= _MAX_TRACKED_URLS
    # 20,000 more hosts of each kind: a few label-cache refills, no growth per host
    assert grown < 1_000_000, grown


def test_host_labels_are_normalised() -> None:
    metrics = Metrics()
    for authority in ("Deb.Debian.org", "deb.debian.org:80", "deb.debian.org.", "[::1]:8080"):
        metrics.record("hit", 1, 0.0, authority, "http://deb.debian.org/x")
    assert dict(metrics.bytes_by_host) == {"deb.debian.org": 3, "[::1]:8080": 1}


async def test_metrics_series_stay_bounded_and_parse(origin: Origin, tmp_path: Path) -> None:
    async with run_node(tmp_path / "c", allow_origins=["*.example.com", origin.authority]) as node:
        # real requests naming hosts off the allowlist (refused 403) get no label of their own
        for i in range(20):
            r = await get(node.port, f"http://evil{i}.test/x")
            assert r.status == 403
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the 403s are recorded
        assert set(node.server.metrics.bytes_by_host) == {OTHER}
        for i in range(5_000):
            node.server.metrics.record("miss", 5, 0.01, f"h{i}.example.com", "http://x/")
            node.cache.upstream.outcomes[(f"h{i}.example.com:80", "ok")] += 1
        r = await admin_call(node, "/metrics")
        assert r.status == 200
        families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    hosts = {s.labels["host"] for s in families["mcc_host_bytes"].samples}
    assert len(hosts) == MAX_HOST_LABELS + 1 and OTHER in hosts
    upstreams = {s.labels["upstream"] for s in families["mcc_upstream_requests"].samples}
    assert len(upstreams) == MAX_HOST_LABELS + 1 and OTHER in upstreams
    total = sum(s.value for s in families["mcc_upstream_requests"].samples)
    assert total == 5_000


def test_fold_tail_keeps_the_largest_and_sums_the_rest() -> None:
    rows = [({"upstream": f"u{i}", "outcome": "ok"}, float(i)) for i in range(10)]
    rows.append(({"upstream": "u0", "outcome": "error"}, 100.0))
    folded = fold_tail(rows, "upstream", cap=3)
    assert sorted((r["upstream"], r["outcome"], v) for r, v in folded) == [
        ("other", "ok", 1 + 2 + 3 + 4 + 5 + 6 + 7),
        ("u0", "error", 100),
        ("u0", "ok", 0),
        ("u8", "ok", 8),
        ("u9", "ok", 9),
    ]
    assert fold_tail(rows, "upstream", cap=100) == rows


# -- the admin API and browsers ----------------------------------------------------------

DATA = b"x" * 100_000
JSON_AND_HEADER = [("content-type", "application/json"), (ADMIN_HEADER, "1")]


@pytest.fixture
async def node(origin: Origin, tmp_path: Path) -> AsyncIterator[Node]:
    """A node with no admin token (the loopback default) holding one object."""
    origin.put("/f.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as n:
        await n.cache.warm(origin.url("/f.bin"))
        assert n.cache.index.object_keys()
        yield n


async def _post(node: Node, path: str, body: bytes, headers: list[tuple[str, str]]) -> Response:
    return await get(
        node.admin_port, path, headers, method="POST", body=body, host=node.admin_authority
    )


async def test_cross_site_purge_without_token_is_refused(node: Node) -> None:
    """Regression: a text/plain POST from evil.example (no preflight needed) purged all."""
    body = json.dumps({"pattern": "*"}).encode()
    evil = [("content-type", "text/plain"), ("origin", "http://evil.example")]
    # the request exactly as a rebound page sends it
    r = await get(node.admin_port, "/purge", evil, method="POST", body=body, host="evil.example")
    assert r.status in (403, 421), r
    # with our own Host, each half of the guard on its own is not enough
    for headers in (
        evil,
        [("content-type", "text/plain")],
        [("content-type", "text/plain"), (ADMIN_HEADER, "1")],  # no JSON type
        [("content-type", "application/json")],  # no custom header
        [("content-type", "application/x-www-form-urlencoded"), (ADMIN_HEADER, "1")],
        [*JSON_AND_HEADER, ("origin", "http://evil.example")],  # a foreign page's Origin
        [*JSON_AND_HEADER, ("origin", "null")],
    ):
        r = await _post(node, "/purge", body, headers)
        assert r.status == 403, (headers, r)
        assert b"\n" not in r.body.strip() and json.loads(r.body)["error"]
    assert node.cache.index.object_keys(), "nothing may be purged"
    # the form the CLI uses works (and a same-origin Origin is fine)
    r = await _post(node, "/purge", body, JSON_AND_HEADER)
    assert r.status == 200 and len(json.loads(r.body)["purged"]) == 1
    assert not node.cache.index.object_keys()
    r = await admin_call(
        node, "/purge", {"pattern": "*"}, [("origin", f"http://{node.admin_authority}")]
    )
    assert r.status == 200


async def test_other_write_methods_are_guarded_too(node: Node) -> None:
    for method in ("PUT", "DELETE", "PATCH"):
        r = await get(node.admin_port, "/purge", method=method, host=node.admin_authority)
        assert r.status == 403, method
        r = await admin_call(node, "/purge", {"pattern": "*"}, method=method)
        assert r.status == 405, method
    assert node.cache.index.object_keys()


async def test_a_foreign_host_header_is_refused(node: Node) -> None:
    """DNS rebinding: evil.example resolved to 127.0.0.1 still says Host: evil.example."""
    port = node.admin_port
    body = json.dumps({"pattern": "*"}).encode()
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1"):
        r = await get(port, "/purge", JSON_AND_HEADER, method="POST", body=body, host=host)
        assert r.status == 421, host
        assert "does not name this admin listener" in json.loads(r.body)["error"]
        assert (await get(port, "/summary", host=host)).status == 421  # reads too
    assert node.cache.index.object_keys()
    # a page cannot read the status page through a rebound name either
    assert (await get(port, "/", host=f"evil.example:{port}")).status == 421
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}"):
        assert (await get(port, "/health", host=host)).status == 200, host


async def test_the_token_is_required_for_writes_when_set(origin: Origin, tmp_path: Path) -> None:
    token = "0123456789abcdef-test-token"
    async with run_node(tmp_path / "c", allow_origins=[origin.authority], admin_token=token) as n:
        r = await admin_call(n, "/purge", {"pattern": "*"})  # JSON + header, but no token
        assert r.status == 401
        r = await admin_call(n, "/purge", {"pattern": "*"}, [("authorization", f"Bearer {token}")])
        assert r.status == 200


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcc", *args], capture_output=True, text=True, timeout=60
    )


async def test_cli_works_without_a_token(node: Node, origin: Origin) -> None:
    admin = ["--admin-listen", node.admin_authority]
    r = await trio.to_thread.run_sync(lambda: _cli("warm", origin.url("/f.bin"), *admin))
    assert r.returncode == 0 and "warmed 1 of 1" in r.stdout, r.stderr
    r = await trio.to_thread.run_sync(lambda: _cli("stats", *admin))
    assert r.returncode == 0 and "ready" in r.stdout, r.stderr
    r = await trio.to_thread.run_sync(lambda: _cli("purge", "127.0.0.1", *admin))
    assert r.returncode == 0 and "1 objects purged" in r.stdout, r.stderr


# -- the admin handlers contain failures --------------------------------------------------


async def _still_serving(node: Node, origin: Origin) -> None:
    assert (await admin_call(node, "/health")).status == 200
    assert (await get(node.port, origin.url("/f.bin"))).body == DATA


async def test_deep_json_is_refused_and_the_node_keeps_serving(node: Node, origin: Origin) -> None:
    """Regression: 50,000 nested arrays raised RecursionError inside the admin."""
    deep = b'{"urls": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    medium = b'{"urls": ' + b"[" * 20 + b'"http://x/"' + b"]" * 20 + b"}"  # parses, too deep
    for body in (deep, medium, b'{"pattern": ' + b'{"a": ' * 30 + b"1" + b"}" * 31):
        for path in ("/warm", "/purge"):
            r = await _post(node, path, body, JSON_AND_HEADER)
            assert r.status == 400, (path, r)
            assert "nested deeper than" in json.loads(r.body)["error"]
    for body in (b"{", b"\xff\xfe", b"[1]", b'"x"'):
        r = await _post(node, "/warm", body, JSON_AND_HEADER)
        assert r.status == 400 and json.loads(r.body)["error"]
    await _still_serving(node, origin)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://{authority}/a b", "space"),
        ("http://{authority}/caf\u00e9", "non-ASCII"),
        ("http://{authority}/\u2028", "non-ASCII"),
        ("http://{authority}/a\tb", "control character"),
        ("http://{authority}/a\r\nX-Injected: 1", "control character"),
        ("http://{authority}/a\x00", "control character"),
        ("http://{authority}/a\x7f", "control character"),
        ("ftp://{authority}/f.bin", "not an http:// or https:// URL"),
        ("/f.bin", "not an http:// or https:// URL"),
        ("http://", "not an http:// or https:// URL"),
        ("http://{authority}/" + "a" * 20_000, "longer than"),
    ],
)
async def test_warm_and_purge_check_urls_at_the_door(
    node: Node, origin: Origin, url: str, problem: str
) -> None:
    """Regression: a URL with a space or non-ASCII character crashed the warm job."""
    url = url.format(authority=origin.authority)
    before = len(origin.requests)
    for path, doc in (("/warm", {"urls": [origin.url("/f.bin"), url]}), ("/purge", {"url": url})):
        r = await admin_call(node, path, doc)
        assert r.status == 400, (path, r)
        assert problem in json.loads(r.body)["error"], r.body
    assert len(origin.requests) == before  # no job was started
    assert node.cache.index.object_keys()
    await _still_serving(node, origin)


async def test_bad_shapes_get_400(node: Node) -> None:
    for path, doc in (
        ("/warm", {"urls": "http://x/"}),
        ("/warm", {"urls": [1]}),
        ("/warm", {"urls": []}),
        ("/purge", {"url": 5}),
        ("/purge", {"pattern": "a b"}),
        ("/purge", {"pattern": "\u00e9.example"}),
        ("/purge", {"pattern": ""}),
        ("/purge", {}),
    ):
        r = await admin_call(node, path, doc)
        assert r.status == 400, (path, doc, r)
    r = await admin_call(node, "/warm", {"urls": ["http://x/"] * 10_001})
    assert r.status == 413
    assert node.cache.index.object_keys()


async def test_a_body_declared_too_large_is_refused_before_it_is_read(node: Node) -> None:
    head = (
        f"POST /warm HTTP/1.1\r\nHost: {node.admin_authority}\r\n"
        f"Content-Type: application/json\r\n{ADMIN_HEADER}: 1\r\n"
        f"Content-Length: {2 * 1024 * 1024}\r\n\r\n"
    ).encode()
    out = await raw_exchange(node.admin_port, head + b"{", read_timeout=5)
    assert out.startswith(b"HTTP/1.1 413 "), out[:200]


async def test_an_exception_in_a_handler_is_a_500_and_the_admin_goes_on(
    node: Node, origin: Origin, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(node.admin, "summary", broken)
    for _ in range(2):
        r = await admin_call(node, "/summary")
        assert r.status == 500 and "internal error" in json.loads(r.body)["error"]
        assert b"injected" not in r.body  # details go to the log, not to the client
    failures = [rec for rec in caplog.records if rec.name == "mcc.admin" and rec.exc_info]
    assert len(failures) == 2 and "/summary" in failures[0].getMessage()
    metrics = (await admin_call(node, "/metrics")).body.decode()
    samples = {
        s.labels.get("where"): s.value
        for f in text_string_to_metric_families(metrics)
        if f.name == "mcc_internal_errors"
        for s in f.samples
        if s.name == "mcc_internal_errors_total"
    }
    assert samples["admin"] == 2
    await _still_serving(node, origin)


async def test_an_exception_in_a_warm_job_fails_the_job_not_the_node(
    node: Node, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(url: str, *_: object) -> object:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(node.cache, "warm", broken)
    r = await admin_call(node, "/warm", {"urls": [origin.url("/f.bin")]})
    assert r.status == 202
    job = json.loads(r.body)
    with trio.fail_after(10):
        while job["state"] != "done":
            await trio.sleep(0.02)
            job = json.loads((await admin_call(node, f"/warm/{job['id']}")).body)
    assert job["failed"] == 1 and "internal error (RuntimeError)" in job["errors"][0]
    assert node.server.metrics.internal_errors.warm == 1
    await _still_serving(node, origin)


async def test_running_warm_jobs_are_capped(
    node: Node, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = trio.Event()

    async def stuck(url: str, *_: object) -> object:
        await release.wait()
        raise McError("released")

    monkeypatch.setattr(node.cache, "warm", stuck)
    doc = {"urls": [origin.url("/f.bin")]}
    for _ in range(MAX_RUNNING_JOBS):
        assert (await admin_call(node, "/warm", doc)).status == 202
    r = await admin_call(node, "/warm", doc)
    assert r.status == 503 and "running already" in json.loads(r.body)["error"]
    release.set()
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert (await admin_call(node, "/warm", doc)).status == 202
