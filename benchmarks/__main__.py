"""mcc's throughput suite, side by side with nginx's slice cache.

    python -m benchmarks run [--scenario all|1,2,...] [--rounds 3] [--seconds 5] [--workers 1]

Starts an nginx origin, the nginx slice cache (the lancache configuration, with
tcp_nopush and aio off) and mcc on loopback, then runs each scenario against both
caches alternately for several rounds, reporting medians and the mcc/nginx ratio.
Results go to ``benchmarks/results/latest.json`` and PNG plots beside it.

Each wrk measurement also gives ``MB_per_cpu_s`` (bytes served per CPU-second of the
serving processes: mcc and any children, or nginx's workers, as many as
``Procs.mcc_workers``) and, for mcc, ``loop_lag_p99_ms`` and
``loop_lag_max_ms``: the event loop's batch lengths during that run, read as the
difference of ``mcc_loop_lag_seconds`` between two scrapes (each figure is the upper
bound of its histogram bucket; ``inf`` past one second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import (
    MiB,
    Procs,
    cpu_seconds,
    ensure_tools,
    loop_lag_between,
    loop_lag_buckets,
    make_data,
    rss_bytes,
    run_wrk,
)

HERE = Path(__file__).parent
nan = float("nan")
BIG = "/big.bin"
SMALL_COUNT = 200
SMALL_SIZE = 64 * 1024

Row = dict[str, Any]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Suite:
    def __init__(self, procs: Procs, rounds: int, seconds: float, big_size: int) -> None:
        self.p = procs
        self.rounds = rounds
        self.seconds = seconds
        self.big_size = big_size
        self.results: dict[str, Row] = {}
        self.step = 0
        self.total = 0  # set by main() from the scenarios chosen

    def progress(self, text: str) -> None:
        """One line per measurement, with a bar of how far the whole run is."""
        self.step += 1
        done = min(self.step, self.total) if self.total else 0
        width = 20
        bar = "#" * (width * done // self.total if self.total else 0)
        where = f"[{bar:<{width}}] {done}/{self.total}" if self.total else f"[{self.step}]"
        print(f"  {time.strftime('%H:%M:%S')} {where} {text}", flush=True)

    def side_by_side(
        self, name: str, measure: Callable[[str], dict[str, float]], targets: tuple[str, ...]
    ) -> Row:
        """Run ``measure(target)`` for each target, alternating order each round."""
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        for r in range(self.rounds):
            order = targets if r % 2 == 0 else tuple(reversed(targets))
            for t in order:
                self.progress(f"{name}: round {r + 1}/{self.rounds}, {t}")
                runs[t].append(measure(t))
        row: Row = {"runs": runs, "median": {}}
        for t in targets:
            keys = runs[t][0].keys()
            row["median"][t] = {k: _median([x[k] for x in runs[t]]) for k in keys}
        self.results[name] = row
        return row

    def warm_up(self) -> None:
        self.progress("warming both caches (whole big file and every small file)")
        for port in (self.p.mcc_port, self.p.nginx_port):
            subprocess.run(
                ["curl", "-sf", f"http://127.0.0.1:{port}{BIG}", "-o", "/dev/null"], check=True
            )
            for i in range(SMALL_COUNT):
                subprocess.run(
                    ["curl", "-sf", f"http://127.0.0.1:{port}/s{i}.bin", "-o", "/dev/null"],
                    check=True,
                )
        time.sleep(1)

    def wrk_measure(self, path: str, conns: int, script: str | None, env: dict[str, str]) -> Any:
        def measure(target: str) -> dict[str, float]:
            lag0 = loop_lag_buckets(self.p.mcc_admin) if target == "mcc" else []
            cpu0 = self.p.cpu_seconds(target)
            res = run_wrk(self.p.port(target), path, conns, self.seconds, script, env)
            cpu = self.p.cpu_seconds(target) - cpu0
            lag = (
                loop_lag_between(lag0, loop_lag_buckets(self.p.mcc_admin))
                if target == "mcc"
                else (nan, nan)
            )
            served_mb = res.bytes_per_s / 1e6 * max(1, round(self.seconds))
            return {
                "MBps": res.bytes_per_s / 1e6,
                "rps": res.requests_per_s,
                "p50_ms": res.p50_ms,
                "p99_ms": res.p99_ms,
                "errors": res.errors,
                "MB_per_cpu_s": served_mb / cpu if cpu else nan,
                "loop_lag_p99_ms": lag[0],
                "loop_lag_max_ms": lag[1],
            }

        return measure

    # -- scenarios -------------------------------------------------------------------

    def s1(self) -> None:
        env = {"OBJ_PATH": BIG, "OBJ_SIZE": str(self.big_size), "MODE": "aligned"}
        for conns in (8, 64):
            self.side_by_side(
                f"1. warm 1 MiB aligned ranges, {conns} conns",
                self.wrk_measure(BIG, conns, "ranges.lua", env),
                ("mcc", "nginx"),
            )

    def s2(self) -> None:
        env = {"OBJ_PATH": BIG, "OBJ_SIZE": str(self.big_size), "MODE": "random"}
        self.side_by_side(
            "2. warm random ranges 4 KiB-4 MiB, 8 conns",
            self.wrk_measure(BIG, 8, "ranges.lua", env),
            ("mcc", "nginx"),
        )

    def s3(self) -> None:
        for conns in (1, 8):
            self.side_by_side(
                f"3. warm whole-file GET, {conns} conns",
                self.wrk_measure(BIG, conns, None, {}),
                ("mcc", "nginx", "origin"),
            )

    def s4(self) -> None:
        self.side_by_side(
            "4. 64 KiB files, 64 conns",
            self.wrk_measure("/", 64, "small.lua", {"SMALL_COUNT": str(SMALL_COUNT)}),
            ("mcc", "nginx"),
        )

    def s5(self) -> None:
        def measure(target: str) -> dict[str, float]:
            if target == "mcc":
                self.p.stop("mcc")
                self.p.start_mcc(fresh=True)
            elif target == "nginx":
                self.p.stop("nginx")
                self.p.start_nginx_cache(fresh=True)
            out = subprocess.run(
                ["curl", "-sf", f"http://127.0.0.1:{self.p.port(target)}{BIG}", "-o",
                 "/dev/null", "-w", "%{speed_download}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            return {"MBps": float(out) / 1e6}

        self.side_by_side("5. cold whole-file GET, 1 conn", measure, ("mcc", "nginx", "origin"))

    def s6(self) -> None:
        start, end, clients = 0, MiB - 1, 50

        def coalesce(port: int, n: int) -> dict[str, list[float]]:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.coalesce", str(port), BIG, str(start),
                 str(end), str(n)],
                capture_output=True, text=True, check=True, cwd=HERE.parent,
            ).stdout  # fmt: skip
            result: dict[str, list[float]] = json.loads(out)
            return result

        def measure(target: str) -> dict[str, float]:
            if target == "mcc":
                self.p.stop("mcc")
                self.p.start_mcc(fresh=True)
            else:
                self.p.stop("nginx")
                self.p.start_nginx_cache(fresh=True)
            port = self.p.port(target)
            lone = coalesce(port, 1)["last"][0]  # a lone cold fetch of the range ...
            if target == "mcc":  # ... then empty caches again for the crowd
                self.p.stop("mcc")
                self.p.start_mcc(fresh=True)
            else:
                self.p.stop("nginx")
                self.p.start_nginx_cache(fresh=True)
            before = self.p.origin_requests(BIG)
            crowd = coalesce(self.p.port(target), clients)
            time.sleep(0.3)
            upstream = self.p.origin_requests(BIG) - before
            return {
                "upstream_requests": upstream,
                "lone_last_ms": lone * 1000,
                "ttfb_p50_ms": _median(crowd["first"]) * 1000,
                "last_max_ms": max(crowd["last"]) * 1000,
                "last_vs_lone": max(crowd["last"]) / lone if lone else float("nan"),
            }

        self.side_by_side("6. 50 clients, one cold 1 MiB range", measure, ("mcc", "nginx"))

    def s7(self) -> None:
        def measure(target: str) -> dict[str, float]:
            pid = self.p.pid(target)
            cpu0 = cpu_seconds(pid)
            peak = 0
            proc = subprocess.Popen(
                ["wrk", "-t2", "-c64", f"-d{max(2, round(self.seconds * 2))}s", "--timeout", "60s",
                 f"http://127.0.0.1:{self.p.port(target)}{BIG}"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            while proc.poll() is None:
                peak = max(peak, rss_bytes(pid))
                time.sleep(0.2)
            out = proc.communicate()[0]
            cpu = cpu_seconds(pid) - cpu0
            m = re.search(r"([\d.]+)(\w+) read", out)
            units = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
            served = float(m.group(1)) * units[m.group(2)] if m else float("nan")
            return {
                "rss_peak_MB": peak / 1e6,
                "cpu_s_per_GB": cpu / (served / 1e9) if served else float("nan"),
                "GB_served": served / 1e9,
            }

        self.side_by_side("7. 64 concurrent whole-file GETs: memory and CPU", measure,
                          ("mcc", "nginx"))  # fmt: skip


SCENARIOS = ("1", "2", "3", "4", "5", "6", "7")


def report(results: dict[str, Row]) -> str:
    lines = []
    for name, row in results.items():
        med = row["median"]
        lines.append(name)
        if not med:
            lines.append(f"    {row.get('error', 'no result')}")
            continue
        keys = list(next(iter(med.values())).keys())
        for k in keys:
            cells = "  ".join(f"{t}={med[t][k]:.1f}" for t in med)
            ratio = ""
            if (
                "mcc" in med
                and "nginx" in med
                and med["nginx"][k]
                and med["nginx"][k] == med["nginx"][k]
            ):
                ratio = f"  mcc/nginx={med['mcc'][k] / med['nginx'][k]:.2f}x"
            if "origin" in med and med["origin"].get(k):
                ratio += f"  mcc/origin={med['mcc'][k] / med['origin'][k]:.2f}x"
            lines.append(f"    {k:<18} {cells}{ratio}")
    return "\n".join(lines)


def plot(results: dict[str, Row], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    names, mcc, nginx, origin = [], [], [], []
    for name, row in results.items():
        med = row["median"]
        if "MBps" in med.get("mcc", {}):
            names.append(
                name.split(",")[0][:28] + ("," + name.split(",")[1] if "," in name else "")
            )
            mcc.append(med["mcc"]["MBps"])
            nginx.append(med.get("nginx", {}).get("MBps", 0))
            origin.append(med.get("origin", {}).get("MBps", 0))
    paths = []
    if names:
        fig, ax = plt.subplots(figsize=(11, 5))
        x = range(len(names))
        w = 0.27
        ax.bar([i - w for i in x], mcc, w, label="mcc")
        ax.bar(list(x), nginx, w, label="nginx slice cache")
        ax.bar([i + w for i in x], origin, w, label="origin (ceiling)")
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("MB/s (median)")
        ax.set_title("Throughput by scenario")
        ax.legend()
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    lat = [(n, r["median"]) for n, r in results.items() if "p99_ms" in r["median"].get("mcc", {})]
    if lat:
        fig, ax = plt.subplots(figsize=(11, 5))
        for j, target in enumerate(("mcc", "nginx")):
            xs = [i + (j - 0.5) * 0.35 for i in range(len(lat))]
            ax.bar(xs, [m[target]["p50_ms"] for _, m in lat], 0.35, label=f"{target} p50")
            ax.scatter(xs, [m[target]["p99_ms"] for _, m in lat], marker="_", s=400,
                       label=f"{target} p99", zorder=3)  # fmt: skip
        ax.set_xticks(range(len(lat)), [n[:40] for n, _ in lat], rotation=20, ha="right",
                      fontsize=8)  # fmt: skip
        ax.set_ylabel("latency, ms")
        ax.set_yscale("log")
        ax.set_title("Latency (median of rounds): bars p50, marks p99")
        ax.legend()
        fig.tight_layout()
        p = out / "latency.png"
        fig.savefig(p, dpi=100)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run scenarios side by side")
    run.add_argument("--scenario", default="all", help="all, or a list like 1,3,6")
    run.add_argument("--rounds", type=int, default=3)
    run.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    run.add_argument("--big-size", type=int, default=1024, help="big file size in MiB")
    run.add_argument("--work", type=Path, default=HERE / "work")
    run.add_argument("--out", type=Path, default=HERE / "results")
    run.add_argument(
        "--mcc-source",
        type=Path,
        default=None,
        help="run mcc from this checkout (e.g. a worktree of main, for before/after)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="mcc worker processes (mcc serve --workers); nginx gets as many",
    )
    run.add_argument(
        "--access-log",
        action="store_true",
        help="both caches write access logs (nginx with buffer=64k flush=1s)",
    )
    args = parser.parse_args(argv)
    chosen = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    ensure_tools()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    big_size = args.big_size * MiB
    www = make_data(args.work, big_size, SMALL_COUNT, SMALL_SIZE)
    started = time.time()
    with Procs(
        args.work,
        www,
        mcc_workers=args.workers,
        mcc_source=args.mcc_source,
        access_logs=args.access_log,
    ) as procs:
        procs.start_mcc(fresh=True)
        procs.start_nginx_cache(fresh=True)
        suite = Suite(procs, args.rounds, args.seconds, big_size)
        # measurements per scenario: configurations x targets, each for every round
        per_round = {"1": 4, "2": 2, "3": 6, "4": 2, "5": 3, "6": 2, "7": 2}
        warm = [s for s in chosen if s in ("1", "2", "3", "4", "7")]
        suite.total = sum(per_round[s] * args.rounds for s in chosen) + (1 if warm else 0)
        if warm:
            suite.warm_up()
        for s in chosen:
            print(f"scenario {s}", flush=True)
            try:
                getattr(suite, f"s{s}")()
            except (subprocess.CalledProcessError, OSError, AssertionError) as exc:
                print(f"scenario {s} failed: {exc}", flush=True)
                suite.results[f"{s}. FAILED"] = {"error": str(exc), "median": {}}
            _write(args.out, started, args, suite.results)
            if s in ("5", "6") and any(w in chosen[chosen.index(s) + 1 :] for w in warm):
                procs.stop("mcc")
                procs.start_mcc(fresh=True)
                procs.stop("nginx")
                procs.start_nginx_cache(fresh=True)
                suite.warm_up()
    _write(args.out, started, args, suite.results)
    text = report(suite.results)
    (args.out / "latest.txt").write_text(text + "\n")
    print(text)
    for p in plot(suite.results, args.out):
        print(f"plot: {p}")
    print(f"results: {args.out / 'latest.json'} ({time.time() - started:.0f} s)")
    return 0


def _write(out: Path, started: float, args: argparse.Namespace, results: dict[str, Row]) -> None:
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        },
        "rounds": args.rounds,
        "seconds": args.seconds,
        "workers": args.workers,
        "results": results,
    }
    (out / "latest.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    sys.exit(main())
