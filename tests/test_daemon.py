"""Running as a daemon: SIGHUP reload and log reopening, the cache directory lock,
the start-up banner, purge patterns and PURGE requests, warm progress in bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fixtures.origin import Fault, Origin
from mcc.http.protocol import Request
from mcc.ops.purge import PurgeTarget
from tests.helpers import (
    Client,
    Node,
    admin_call,
    free_port,
    get,
    run_node,
    serve_argv,
    wait_serving,
)

TOKEN = "0123456789abcdef-test-token"
BIG = os.urandom(3 * 1024 * 1024 + 777)


def _config_text(
    port: int, admin: int, cache: Path, log: Path, allow: list[str], **extra: str
) -> str:
    lines = [
        f'listen = ["127.0.0.1:{port}"]',
        f'admin_listen = "127.0.0.1:{admin}"',
        f"allow_origins = {json.dumps(allow)}",
        f'access_log = "{log}"',
        'access_log_format = "combined"',
        "readahead_blocks = 0",  # one block at a time: the throttled download lasts
        'node_id = "daemon"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[[drives]]",
        f'path = "{cache}"',
    ]
    return "\n".join(lines) + "\n"


async def _wait_for(path: Path, text: str, within: float = 10) -> str:
    """Wait until the file at ``path`` contains ``text``; returns its content."""
    with trio.fail_after(within):
        while True:
            if await trio.Path(path).exists():
                content = await trio.Path(path).read_text()
                if text in content:
                    return content
            await trio.sleep(0.05)


async def test_sighup_reopens_logs_and_reloads_config_while_a_download_runs(
    origin: Origin, tmp_path: Path, nursery: trio.Nursery
) -> None:
    other = Origin()  # not allowed until the reload
    await nursery.start(other.serve)
    other.put("/o.bin", b"other origin")
    origin.put("/slow.bin", BIG)
    origin.chunk_size = 32 * 1024
    origin.faults["/slow.bin"] = Fault(body_delay=0.03)  # ~1 s per 1 MiB block
    port, admin = free_port(), free_port()
    cfg, log, errors = tmp_path / "mcc.toml", tmp_path / "access.log", tmp_path / "stderr"
    cfg.write_text(_config_text(port, admin, tmp_path / "c", log, [origin.authority]))
    with errors.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mcc", "serve", "--config", str(cfg)], stderr=err
        )
    try:
        await wait_serving(port)
        banner = errors.read_text()
        assert f"admin API and status page on http://127.0.0.1:{admin}/" in banner
        assert f"allowlist: 1 origin patterns ({origin.authority})" in banner
        assert "parents: none configured" in banner and str(tmp_path / "c") in banner
        assert (await get(port, other.url("/o.bin"))).status == 403
        result: list[bytes] = []

        async def download() -> None:
            async with Client.connect(port) as c:
                result.append((await c.request(origin.url("/slow.bin"))).body)

        async with trio.open_nursery() as downloads:
            downloads.start_soon(download)
            await origin.wait_request("/slow.bin")
            log.rename(tmp_path / "access.log.1")  # as logrotate does
            cfg.write_text(
                _config_text(
                    port, admin, tmp_path / "c", log, [origin.authority, other.authority],
                    block_size='"256KiB"',  # cannot change live
                )
            )  # fmt: skip
            proc.send_signal(signal.SIGHUP)
            await _wait_for(errors, "reloaded")
            assert result == []  # the download is still running
            r = await get(port, other.url("/o.bin"))  # the new allowlist applies
            assert r.status == 200 and r.body == b"other origin"
        assert result == [BIG]  # the transfer under way finished intact
        stderr = errors.read_text()
        assert "reload: block_size cannot change while running" in stderr
        assert "changed: allow_origins" in stderr
        reopened = await _wait_for(log, "/o.bin")
        assert re.search(
            r'^127\.0\.0\.1 - - \[[^]]+\] "GET http://127\.0\.0\.1:\d+/o\.bin HTTP/1\.1" 200 12 ',
            reopened,
            re.MULTILINE,
        ), reopened
        rotated = (tmp_path / "access.log.1").read_text()  # only lines from before
        assert rotated.count("/o.bin") == 1 and '/o.bin HTTP/1.1" 403 ' in rotated

        # a bad config is refused, one line per problem, and the old one stays
        cfg.write_text('allow_origins = "mirror"\n[limits]\nmax_connections = -5\n')
        proc.send_signal(signal.SIGHUP)
        stderr = await _wait_for(errors, "reload refused: the config in force stays")
        assert (
            'reload refused: allow_origins: expected a list of strings, got a string "mirror"'
            in stderr
        )
        assert "reload refused: limits.max_connections: -5 is less than 1" in stderr
        assert (await get(port, other.url("/o.bin"))).status == 200
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _mcc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcc", *args], capture_output=True, text=True, timeout=60
    )


async def test_a_second_server_and_verify_are_refused_on_a_locked_cache(
    origin: Origin, tmp_path: Path
) -> None:
    cache = tmp_path / "c"
    port, admin = free_port(), free_port()
    argv = serve_argv(port, cache, origin.authority, "--admin-listen", f"127.0.0.1:{admin}")
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        await wait_serving(port)
        second = serve_argv(free_port(), cache, origin.authority)[3:]
        r = await trio.to_thread.run_sync(lambda: _mcc(*second))
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"mcc: cache directory {cache} is in use by another mcc process (PID {proc.pid})"
        ]
        r = await trio.to_thread.run_sync(lambda: _mcc("verify", "--cache-dir", str(cache)))
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"PID {proc.pid}" in r.stderr and "mcc verify --live" in r.stderr
        r = await trio.to_thread.run_sync(
            lambda: _mcc("verify", "--live", "--admin-listen", f"127.0.0.1:{admin}")
        )
        assert r.returncode == 0 and re.search(r"^corrupt \(found\)\s+0", r.stdout, re.M), r
    finally:
        proc.terminate()
        await proc.wait()
    # the lock goes with the process: now verify walks the cache
    r = await trio.to_thread.run_sync(lambda: _mcc("verify", "--cache-dir", str(cache)))
    assert r.returncode == 0, r.stderr


@pytest.fixture
async def node(origin: Origin, tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(
        tmp_path / "c", allow_origins=[origin.authority], admin_token=TOKEN
    ) as node:
        yield node


@pytest.mark.parametrize(
    ("target", "matched"),
    [
        ("mirror.example", ["a1", "a8", "s"]),  # any port
        ("mirror.example:8000", ["a8"]),
        ("MIRROR.example.:80", ["a1", "s"]),
        ("*.example", ["a1", "a8", "b", "s"]),
        ("*.mirror.example", ["b"]),
        ("http://mirror.example/pool/", ["a1"]),
        ("http://mirror.example:8000/", ["a8"]),
        ("http://elsewhere.example/", []),
    ],
)
def test_purge_targets_match_like_the_allowlist(target: str, matched: list[str]) -> None:
    keys = {
        "a1": "http://mirror.example/pool/a.deb",
        "a8": "http://mirror.example:8000/pool/a.deb",
        "b": "http://cdn.mirror.example/b",
        "s": "http://mirror.example/sums",
    }
    t = PurgeTarget.parse(target)
    assert sorted(name for name, key in keys.items() if t.matches(key)) == matched


@pytest.mark.parametrize("bad", ["not a url", "ftp://mirror.example/", "*.", "a:99999"])
def test_bad_purge_targets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        PurgeTarget.parse(bad)


async def test_cli_purge_by_prefix_and_host_port(node: Node, origin: Origin) -> None:
    for path in ("/a/1", "/a/2", "/b/1"):
        origin.put(path, path.encode() * 1000)
        await node.cache.warm(origin.url(path))
    admin = ["--admin-listen", f"127.0.0.1:{node.admin_port}", "--admin-token", TOKEN]
    r = await trio.to_thread.run_sync(lambda: _mcc("purge", origin.url("/a/"), *admin))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"purged {origin.url('/a/1')}",
        f"purged {origin.url('/a/2')}",
        "2 objects purged",
    ]
    r = await trio.to_thread.run_sync(lambda: _mcc("purge", origin.authority, *admin))
    assert r.returncode == 0 and f"purged {origin.url('/b/1')}" in r.stdout, r.stderr
    assert node.cache.index.object_keys() == []
    r = await trio.to_thread.run_sync(lambda: _mcc("purge", origin.authority, *admin))
    assert r.returncode == 1 and r.stderr == f"mcc: nothing stored matches {origin.authority}\n"
    r = await trio.to_thread.run_sync(lambda: _mcc("purge", "not a url", *admin))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("mcc: purge: 'not a url' is neither an http:// URL nor")


async def test_purge_request_purges_and_never_reaches_the_origin(
    node: Node, origin: Origin
) -> None:
    origin.put("/p.bin", b"p" * 100_000)
    url = origin.url("/p.bin")
    assert (await get(node.port, url)).status == 200
    await node.cache.wait_idle()
    r = await get(node.port, url, method="PURGE")
    assert r.status == 200 and url in r.body.decode()
    r = await get(node.port, url, method="PURGE")
    assert r.status == 404
    assert origin.count("/p.bin", "PURGE") == 0
    r = await get(node.port, url)
    assert r.header("cache-status") == "node; fwd=miss; stored"
    assert origin.count("/p.bin", "PURGE") == 0


async def test_purge_request_from_elsewhere_needs_the_token(node: Node) -> None:
    def req(*headers: tuple[str, str]) -> Request:
        return Request("PURGE", "http://x/", tuple(headers), "1.1", False)

    server = node.server
    assert server._may_purge("127.0.0.1:5000", req())
    assert server._may_purge("::1:5000", req())
    assert not server._may_purge("10.1.2.3:5000", req())
    assert not server._may_purge("10.1.2.3:5000", req(("authorization", "Bearer nope")))
    assert server._may_purge("10.1.2.3:5000", req(("authorization", f"Bearer {TOKEN}")))


async def test_warm_progress_is_in_bytes(node: Node, origin: Origin) -> None:
    data = os.urandom(2 * 1024 * 1024)
    origin.put("/w.bin", data)
    origin.chunk_size = 16 * 1024
    origin.faults["/w.bin"] = Fault(body_delay=0.01)
    auth = [("authorization", f"Bearer {TOKEN}")]
    body = json.dumps({"urls": [origin.url("/w.bin")]}).encode()
    job = json.loads((await admin_call(node, "/warm", json.loads(body), auth)).body)
    seen = []
    with trio.fail_after(30):
        while job["state"] != "done":
            await trio.sleep(0.02)
            job = json.loads(
                (await get(node.admin_port, f"/warm/{job['id']}", host=node.admin_authority)).body
            )
            seen.append(job)
    running = [j for j in seen if j["state"] == "running" and 0 < j["bytes"] < len(data)]
    assert running, seen
    assert all(j["totalBytes"] == len(data) for j in running)
    assert any(j["bytesPerSecond"] > 0 and j["etaSeconds"] is not None for j in running)
    assert job["bytes"] == job["totalBytes"] == len(data) and job["done"] == 1


async def test_cli_warm_reports_bytes_without_a_terminal(node: Node, origin: Origin) -> None:
    data = os.urandom(1024 * 1024 + 5)
    origin.put("/cw.bin", data)
    admin = ["--admin-listen", f"127.0.0.1:{node.admin_port}", "--admin-token", TOKEN]
    r = await trio.to_thread.run_sync(lambda: _mcc("warm", origin.url("/cw.bin"), *admin))
    assert r.returncode == 0, r.stderr
    assert "warmed 1 of 1 objects (1.0 MiB), 0 failed" in r.stdout
    assert r.stderr.splitlines()[-1].startswith("warming: 1.0 MiB of 1.0 MiB (100 %)")
