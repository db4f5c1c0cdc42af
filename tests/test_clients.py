"""Real clients (curl, aria2c) and the real `mcc serve` process (SIGTERM drain)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from fixtures.origin import Fault, Origin
from tests.helpers import Client, free_port, run_node, serve_argv, wait_serving

pytestmark = pytest.mark.tools
DATA = os.urandom(3 * 1024 * 1024 + 4321)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it with apt-get)")
    return path


async def test_curl_fetches_through_mcc(origin: Origin, tmp_path: Path) -> None:
    curl = _need("curl")
    origin.put("/file.iso", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        for i in range(2):  # cold, then warm
            out = tmp_path / f"out{i}"
            await trio.run_process(
                [curl, "-sSf", "-x", node.url, origin.url("/file.iso"), "-o", str(out)]
            )
            assert out.read_bytes() == DATA
        part = tmp_path / "part"
        await trio.run_process(
            [
                curl,
                "-sSf",
                "-x",
                node.url,
                "-r",
                "1000-99999",
                origin.url("/file.iso"),
                "-o",
                str(part),
            ]
        )
        assert part.read_bytes() == DATA[1000:100_000]


async def test_aria2c_segmented_download_checksum(origin: Origin, tmp_path: Path) -> None:
    aria2c = _need("aria2c")
    origin.put("/big.bin", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        await trio.run_process(
            [
                aria2c,
                "-q",
                "-x8",
                "-s8",
                "--min-split-size=1M",
                "--allow-overwrite=true",
                f"--all-proxy={node.url}",
                "-d",
                str(tmp_path),
                "-o",
                "big.bin",
                origin.url("/big.bin"),
            ]
        )
    got = (tmp_path / "big.bin").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert any(r.headers.get("range") for r in origin.requests)


async def test_sigterm_drains_running_responses(origin: Origin, tmp_path: Path) -> None:
    origin.put("/slow.bin", DATA)
    origin.chunk_size = 64 * 1024
    origin.faults["/slow.bin"] = Fault(body_delay=0.01)  # ~0.5 s for the whole body
    port = free_port()
    proc = await trio.lowlevel.open_process(
        serve_argv(port, tmp_path / "c", origin.authority, "--shutdown-grace", "20s"),
        stderr=subprocess.PIPE,
    )
    try:
        await wait_serving(port)
        result: list[bytes] = []

        async def download() -> None:
            async with Client.connect(port) as c:
                result.append((await c.request(origin.url("/slow.bin"))).body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await origin.wait_request("/slow.bin")
            proc.send_signal(signal.SIGTERM)
            await trio.sleep(0.2)
            with pytest.raises(OSError):  # no longer accepting
                await trio.open_tcp_stream("127.0.0.1", port)
        assert result == [DATA]
        with trio.fail_after(10):
            code = await proc.wait()
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        await proc.stderr.aclose()
