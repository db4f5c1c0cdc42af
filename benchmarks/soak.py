"""A bounded soak: mixed hits, misses, joins, client aborts and evictions against a real
mcc process with a small max_size, checking every byte received against the origin's
files and sampling mcc's RSS and open file descriptors.

    python -m benchmarks.soak [--minutes 10] [--clients 24] [--max-size 96MiB]

Prints a summary and writes benchmarks/results/soak.json. Exit status 1 when any byte
was wrong or RSS / fds grew past the bounds given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h11
import trio

from mcc.units import parse_size

from .harness import MiB, Procs, ensure_tools, free_port, rss_bytes, wait_http

HERE = Path(__file__).parent


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes_checked = 0
        self.wrong = 0
        self.errors = 0
        self.aborts = 0
        self.statuses: dict[int, int] = {}


async def _get(port: int, path: str, rng: tuple[int, int] | None, abort_after: int | None
               ) -> tuple[int, bytes]:  # fmt: skip
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", f"127.0.0.1:{port}")]  # this node: the reverse-proxy form
        if rng:
            headers.append(("range", f"bytes={rng[0]}-{rng[1]}"))
        data = conn.send(h11.Request(method="GET", target=path, headers=headers)) or b""
        await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if abort_after is not None and len(body) >= abort_after:
                    return -1, bytes(body)  # the client hangs up mid-body
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("closed early")
    finally:
        await stream.aclose()


async def soak(port: int, files: dict[str, bytes], seconds: float, clients: int,
               stats: Stats) -> None:  # fmt: skip
    deadline = trio.current_time() + seconds
    names = sorted(files)
    hot = names[: max(1, len(names) // 8)]

    async def worker(seed: int) -> None:
        r = random.Random(seed)
        while trio.current_time() < deadline:
            # a skewed mix: a hot set (hits), the long tail (misses, evictions)
            path = r.choice(hot) if r.random() < 0.6 else r.choice(names)
            data = files[path]
            kind = r.random()
            rng: tuple[int, int] | None = None
            if kind < 0.7:
                a = r.randrange(len(data))
                rng = (a, min(len(data) - 1, a + r.randrange(1, 3 * MiB)))
            abort = r.randrange(1, 512 * 1024) if r.random() < 0.1 else None
            joiners = 3 if r.random() < 0.05 else 0  # the same range, several at once
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(joiners):
                        nursery.start_soon(check, path, data, rng, None)
                    await check(path, data, rng, abort)
            except* (OSError, EOFError, trio.BrokenResourceError, h11.ProtocolError) as group:
                stats.errors += len(group.exceptions)
                print(f"client error: {group.exceptions[0]!r}", flush=True)

    async def check(path: str, data: bytes, rng: tuple[int, int] | None,
                    abort: int | None) -> None:  # fmt: skip
        status, body = await _get(port, path, rng, abort)
        stats.requests += 1
        stats.statuses[status] = stats.statuses.get(status, 0) + 1
        want = data if rng is None else data[rng[0] : rng[1] + 1]
        if status == -1:
            stats.aborts += 1
            ok = want.startswith(body[: len(want)])
        elif status in (200, 206):
            ok = body == want
        else:
            stats.errors += 1
            return
        stats.bytes_checked += len(body)
        if not ok:
            stats.wrong += 1
            print(f"WRONG BYTES: {path} {rng} status {status}", flush=True)

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(worker, i)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-size", default="96MiB")
    parser.add_argument("--objects", type=int, default=120)
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("--max-fd-growth", type=int, default=64)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "soak")
    args = parser.parse_args(argv)
    ensure_tools()
    if args.work.exists():
        shutil.rmtree(args.work)
    www = args.work / "www"
    www.mkdir(parents=True)
    rng = random.Random(7)
    files: dict[str, bytes] = {}
    for i in range(args.objects):
        size = rng.choice([rng.randrange(1, 64 * 1024), rng.randrange(64 * 1024, 2 * MiB),
                           rng.randrange(2 * MiB, 8 * MiB)])  # fmt: skip
        data = os.urandom(size)
        (www / f"o{i}.bin").write_bytes(data)
        files[f"/o{i}.bin"] = data
    total = sum(len(d) for d in files.values())
    print(f"{len(files)} objects, {total / MiB:.0f} MiB at the origin; mcc max_size "
          f"{args.max_size}", flush=True)  # fmt: skip
    with Procs(args.work, www) as procs:
        port, admin = free_port(), free_port()
        with open(args.work / "mcc.err", "wb") as err_log:  # the child keeps its own copy
            mcc = subprocess.Popen(
            [sys.executable, "-m", "mcc", "serve", "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin}",
             "--origin", f"http://127.0.0.1:{procs.origin_port}",
             "--allow-origin", f"127.0.0.1:{procs.origin_port}",
             "--cache-dir", str(args.work / "cache"), "--max-size", args.max_size,
             "--min-free", "0", "--block-size", "256KiB", "--access-log", "",
             "--log-level", os.environ.get("SOAK_LOG_LEVEL", "warning")],
                stderr=err_log,
            )  # fmt: skip
        try:
            wait_http(port, "/o0.bin")
            samples: list[dict[str, float]] = []
            stats = Stats()
            seconds = args.minutes * 60

            async def run() -> None:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(soak, port, files, seconds, args.clients, stats)
                    t0 = trio.current_time()
                    while trio.current_time() - t0 < seconds:
                        samples.append({
                            "t": round(trio.current_time() - t0, 1),
                            "rss_MB": rss_bytes(mcc.pid) / 1e6,
                            "fds": _open_fds(mcc.pid),
                            "requests": stats.requests,
                        })  # fmt: skip
                        print(f"  t={samples[-1]['t']:>5.0f}s requests={stats.requests} "
                              f"rss={samples[-1]['rss_MB']:.0f}MB fds={samples[-1]['fds']} "
                              f"wrong={stats.wrong}", flush=True)  # fmt: skip
                        await trio.sleep(min(10.0, seconds / 6))

            trio.run(run)
            time.sleep(1)
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics = r.read().decode()
            evictions = next(
                float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("mcc_evictions_total")
            )  # fmt: skip
            stored = sum(
                float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("mcc_store_bytes{")
            )  # fmt: skip
        finally:
            mcc.terminate()
            mcc.wait()
    warm = samples[len(samples) // 3 :] or samples  # after the first third: steady state
    rss_growth = warm[-1]["rss_MB"] - warm[0]["rss_MB"]
    fd_growth = warm[-1]["fds"] - warm[0]["fds"]
    doc: dict[str, Any] = {
        "minutes": args.minutes, "clients": args.clients, "objects": len(files),
        "origin_MiB": total / MiB, "max_size": args.max_size,
        "requests": stats.requests, "GB_checked": stats.bytes_checked / 1e9,
        "wrong_responses": stats.wrong, "client_aborts": stats.aborts,
        "errors": stats.errors, "statuses": stats.statuses, "evictions": evictions,
        "stored_MiB_at_end": stored / MiB,
        "rss_MB": {"first": samples[0]["rss_MB"], "max": max(s["rss_MB"] for s in samples),
                   "last": samples[-1]["rss_MB"], "steady_growth": rss_growth},
        "fds": {"first": samples[0]["fds"], "max": max(s["fds"] for s in samples),
                "last": samples[-1]["fds"], "steady_growth": fd_growth},
        "samples": samples,
    }  # fmt: skip
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "soak.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: v for k, v in doc.items() if k != "samples"}, indent=1))
    bad = (
        stats.wrong
        or stats.errors > 0.01 * max(1, stats.requests)
        or rss_growth > args.max_rss_growth_mb
        or fd_growth > args.max_fd_growth
        or stored > 1.05 * parse_size(args.max_size)
    )
    print("SOAK FAILED" if bad else "soak passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
