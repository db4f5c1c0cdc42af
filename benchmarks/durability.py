"""The cold path with durable commits on and off: MB/s of misses, side by side.

    python -m benchmarks.durability [--size 64MiB] [--rounds 3] [--clients 1,4]
                                    [--baseline /path/to/main/checkout]

Starts the test origin (``fixtures/origin.py``) in this process and, for each round
and each setting, a fresh ``mcc serve`` on an empty cache directory under
``--work`` (default: a temporary folder on the disk of the current directory, so
fsyncs reach a real disk, not a tmpfs): ``durable`` (the default: each block's blob
fsynced, folders and index WAL fsynced per group commit), the same with group commit
off (``--commit-batch 1``: every block pays its own folder and WAL fsyncs) and
``--no-durable``; with ``--baseline DIR``, also the mcc of another checkout (say the
main branch, before durable commits) as it is. Each client fetches its own object of
``--size`` whole, cold, through mcc; MB/s is the sum of bytes over the wall time until
the last client's last byte, plus the time until every block has its index row (the
index read, read-only, every 5 ms). The settings alternate within each round; the
report gives the median of ``--rounds`` and each setting's ratio to ``not durable``.
Results go to ``benchmarks/results/durability.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from fixtures.origin import Origin
from mcc.units import parse_size

from .harness import fetch_whole, free_port

HERE = Path(__file__).parent
MB = 1_000_000
# durable with group commit (the default), durable with every block flushed on its own
# (group commit off: a batch of one), and no fsync at all
SETTINGS = {
    "durable": [],
    "durable, no group commit": ["--commit-batch", "1"],
    "not durable": ["--no-durable"],
}


async def _fetch(port: int, target: str, size: int) -> None:
    """One whole GET on its own connection; the body is counted, not kept."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await fetch_whole(stream, target, size, close=True)


async def _wait_port(port: int) -> None:
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def _stored_blocks(cache_dir: Path) -> int:
    """Block rows in the node's index (read-only; WAL mode lets a reader in)."""
    try:
        db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite3'}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return int(db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


async def _one(
    origin: Origin,
    work: Path,
    extra: list[str],
    clients: int,
    size: int,
    block: int,
    code: Path | None = None,
) -> float:
    """One cold run of one setting: MB/s until every client is served and every block
    is stored."""
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    port = free_port()
    argv = [
        sys.executable, "-m", "mcc", "serve", "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{free_port()}", "--cache-dir", str(cache_dir),
        "--allow-origin", origin.authority, "--access-log", "", "--log-level", "warning",
        "--max-size", "100GiB", "--min-free", "0", *extra,
    ]  # fmt: skip
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
    proc = await trio.lowlevel.open_process(argv, env=env)
    try:
        await _wait_port(port)
        tag = random.getrandbits(64)  # fresh URLs: every byte is a miss
        t0 = time.monotonic()
        async with trio.open_nursery() as nursery:
            for c in range(clients):
                target = f"/o{c}.bin?cold={tag}&cacheHostOrigin={origin.authority}"
                nursery.start_soon(_fetch, port, target, size)
        want = clients * (size // block)
        for _ in range(12_000):  # then until every block has its index row (60 s at most)
            if _stored_blocks(cache_dir) >= want:
                break
            await trio.sleep(0.005)
        else:
            raise RuntimeError(f"only {_stored_blocks(cache_dir)} of {want} blocks stored")
        wall = time.monotonic() - t0
        return clients * size / wall / MB
    finally:
        proc.terminate()
        with trio.move_on_after(20):
            await proc.wait()


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        origin = Origin()
        for c in range(max(args.clients)):
            origin.put(f"/o{c}.bin", random.Random(c).randbytes(args.size))
        await nursery.start(origin.serve)
        for clients in args.clients:
            settings: dict[str, tuple[list[str], Path | None]] = {
                name: (extra, None) for name, extra in SETTINGS.items()
            }
            if args.baseline is not None:  # another checkout's mcc (e.g. main), as it is
                settings[f"baseline {args.baseline}"] = ([], args.baseline)
            runs: dict[str, list[float]] = {name: [] for name in settings}
            for _ in range(args.rounds):
                for name, (extra, code) in settings.items():
                    mbs = await _one(origin, work, extra, clients, args.size, 1 << 20, code)
                    runs[name].append(mbs)
            med = {name: statistics.median(v) for name, v in runs.items()}
            base = med["not durable"]
            rows[f"{clients} clients"] = {
                "MB_per_s_median": {k: round(v, 1) for k, v in med.items()},
                "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                "over_not_durable": {k: round(v / base, 3) for k, v in med.items()},
            }
            figures = ", ".join(f"{k} {v:.1f} MB/s ({v / base:.2f}x)" for k, v in med.items())
            print(
                f"  {clients} client(s) x {args.size / MB:.0f} MB cold, medians of "
                f"{args.rounds}: {figures}",
                flush=True,
            )
        nursery.cancel_scope.cancel()
    return rows


def _head(checkout: Path) -> str:
    r = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=64 * 1024 * 1024, help="object size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4],
        help="comma-separated counts of concurrent cold clients (default 1,4)",
    )
    parser.add_argument(
        "--work", type=Path, default=Path.cwd(), help="folder for the cache directories"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run the mcc of another checkout (its folder put first on PYTHONPATH)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcc-bench-durability-", dir=args.work) as tmp:
        rows = trio.run(_run, args, Path(tmp))
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "size": args.size,
        "rounds": args.rounds,
        "baseline_commit": _head(args.baseline) if args.baseline is not None else None,
        **rows,
    }
    out = HERE / "results" / "durability.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
