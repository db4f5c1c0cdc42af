"""Two mcc checkouts side by side on the same hits: a before/after of one change.

    python -m benchmarks.pair --before /work/main [--after .] [--scenario small,ranges]
        [--rounds 5] [--seconds 3] [--big-size 64] [--access-log]

Starts one nginx origin and two mcc nodes, one run from each checkout (its ``mcc/``
first on the import path), warms both, then measures them alternately (the order
flips every round) with wrk: ``small`` is 64 KiB whole-object hits on 64 connections
(scenario 4 of the main suite), ``ranges`` is 1 MiB aligned range hits on 8
connections (scenario 1). Each row gives the medians of both nodes and their ratio
(after/before): requests per second, MB served per CPU-second of the node, and the
loop-lag p99 and maximum over the run (histogram bucket bounds, from /metrics). A
shared, noisy machine shifts both nodes alike, so the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from .harness import (
    MiB,
    Procs,
    cpu_seconds,
    ensure_tools,
    free_port,
    loop_lag_between,
    loop_lag_buckets,
    make_data,
    run_wrk,
    wait_http,
)

HERE = Path(__file__).parent
SMALL_COUNT = 200
SMALL_SIZE = 64 * 1024


class _Node:
    """One mcc node run from ``source``."""

    def __init__(self, name: str, source: Path, work: Path, origin_port: int, log: bool) -> None:
        self.name = name
        cache = work / f"pair-{name}-cache"
        if cache.exists():
            shutil.rmtree(cache)
        self.port, self.admin = free_port(), free_port()
        argv = [
            sys.executable, "-m", "mcc", "serve",
            "--listen", f"127.0.0.1:{self.port}",
            "--admin-listen", f"127.0.0.1:{self.admin}",
            "--origin", f"http://127.0.0.1:{origin_port}",
            "--allow-origin", f"127.0.0.1:{origin_port}",
            "--cache-dir", str(cache), "--max-size", "40GiB", "--min-free", "1GiB",
            "--block-size", "1MiB", "--log-level", "warning",
            "--access-log", str(work / f"pair-{name}-access.log") if log else "",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(source.resolve()))
        with open(work / f"pair-{name}.out", "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, cwd=work, env=env)
        wait_http(self.port, "/s0.bin")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _warm(port: int, big_size: int) -> None:
    paths = ["/big.bin", *(f"/s{i}.bin" for i in range(SMALL_COUNT))]
    urls = [f"http://127.0.0.1:{port}{p}" for p in paths]
    for i in range(0, len(urls), 50):  # curl fetches many URLs per process
        argv = ["curl", "-sf"]
        for u in urls[i : i + 50]:
            argv += [u, "-o", "/dev/null"]
        subprocess.run(argv, check=True)


def _measure(node: _Node, scenario: str, seconds: float, big_size: int) -> dict[str, float]:
    if scenario == "small":
        path, conns, script = "/", 64, "small.lua"
        env = {"SMALL_COUNT": str(SMALL_COUNT)}
    else:
        path, conns, script = "/big.bin", 8, "ranges.lua"
        env = {"OBJ_PATH": "/big.bin", "OBJ_SIZE": str(big_size), "MODE": "aligned"}
    lag0 = loop_lag_buckets(node.admin)
    cpu0 = cpu_seconds(node.proc.pid)
    res = run_wrk(node.port, path, conns, seconds, script, env)
    cpu = cpu_seconds(node.proc.pid) - cpu0
    p99, top = loop_lag_between(lag0, loop_lag_buckets(node.admin))
    served_mb = res.bytes_per_s / 1e6 * max(1, round(seconds))
    return {
        "rps": res.requests_per_s,
        "MB_per_cpu_s": served_mb / cpu if cpu else float("nan"),
        "p99_ms": res.p99_ms,
        "loop_lag_p99_ms": p99,
        "loop_lag_max_ms": top,
        "errors": res.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pair", description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the baseline")
    parser.add_argument("--after", type=Path, default=HERE.parent, help="checkout to compare")
    parser.add_argument("--scenario", default="small,ranges")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--big-size", type=int, default=64, help="big file size in MiB")
    parser.add_argument("--access-log", action="store_true", help="both nodes write one")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    args = parser.parse_args(argv)
    ensure_tools()
    args.work.mkdir(parents=True, exist_ok=True)
    big_size = args.big_size * MiB
    www = make_data(args.work, big_size, SMALL_COUNT, SMALL_SIZE)
    with Procs(args.work, www) as procs:
        nodes = [
            _Node(name, src, args.work, procs.origin_port, args.access_log)
            for name, src in (("before", args.before), ("after", args.after))
        ]
        try:
            for node in nodes:
                _warm(node.port, big_size)
            for scenario in args.scenario.split(","):
                runs: dict[str, list[dict[str, float]]] = {n.name: [] for n in nodes}
                for r in range(args.rounds):
                    for node in nodes if r % 2 == 0 else nodes[::-1]:
                        runs[node.name].append(_measure(node, scenario, args.seconds, big_size))
                print(f"{scenario} ({args.rounds} rounds of {args.seconds:g} s, medians)")
                for key in runs["before"][0]:
                    b = statistics.median(x[key] for x in runs["before"])
                    a = statistics.median(x[key] for x in runs["after"])
                    ratio = f"  after/before={a / b:.2f}x" if b and b == b else ""
                    print(f"    {key:<16} before={b:.1f}  after={a:.1f}{ratio}", flush=True)
        finally:
            for node in nodes:
                node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
