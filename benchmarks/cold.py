"""Cold downloads: mcc against going direct (and nginx's slice cache), side by side.

    python -m benchmarks.cold [--size 1GiB] [--slow-size 120MB] [--rate 20MB] [--rounds 3]

Four measurements, each one run of ``--rounds`` interleaved rounds, medians:

(a) an origin pacing each connection to ``--rate`` bytes/s (``SO_MAX_PACING_RATE``,
    like a CDN edge reached over a WAN; see :func:`serve_paced` for why not nginx's
    ``limit_rate``), one ``--slow-size`` object fetched whole: direct from the
    origin, through a cold mcc, through a cold mcc whose read-ahead is held at 4 blocks
    (``mcc-fixed``, as before it adapted), through a cold nginx ``slice 1m`` cache;
(b) an unthrottled nginx origin on loopback, one ``--size`` object fetched whole:
    direct against a cold mcc;
(c) time to first byte of a cold 1 MiB range in the middle of the ``--size`` object:
    direct against a cold mcc;
(d) the same against (a)'s origin answering every request ``--delay`` late (a WAN
    round trip): what a client far from the origin sees.

Every body is hashed (blake3) as it arrives and compared with the origin's file; a
mismatch stops the run. Caches are started empty for every cold measurement. mcc's CPU
seconds (from /proc) are reported per GB it served. Results go to
``benchmarks/results/cold.json``; extra ``mcc serve`` flags can be passed after
``--mcc``, e.g. ``--mcc --max-parallel-fetches 4``. ``--baseline DIR`` adds a cold mcc
run from another checkout's tree (``mcc-base``, e.g. a worktree of main) to every
part, measured side by side with this one (before/after in one run).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import blake3

from mcc.units import parse_duration, parse_size

from .harness import Procs, ensure_tools, free_port, make_data, wait_http

HERE = Path(__file__).parent
MB = 1_000_000
MiB = 1024 * 1024
_BUFFER = 1024 * 1024  # the client's receive buffer (reused)
_RANGE = MiB  # (c)'s cold range
# mcc's read-ahead as it was before it adapted: 4 blocks ahead, never more
_FIXED = ["--readahead-blocks", "4", "--max-parallel-fetches", "5"]

# SO_MAX_PACING_RATE (linux/asm-generic/socket.h): the kernel paces the socket's sends
# (TCP's own pacing, no qdisc needed), so the limit holds per connection from its first
# byte. nginx's limit_rate cannot stand in: it counts per request in whole seconds and
# lets the first second's worth (20 MB) of every request through unthrottled.
_SO_MAX_PACING_RATE = 47


class _PacedHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files with one Range, sent with sendfile on a paced socket."""

    protocol_version = "HTTP/1.1"
    root = Path(".")
    rate = 0
    delay = 0.0  # seconds before each response head (a WAN round trip)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, self.rate)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.root / self.path.split("?")[0].lstrip("/")
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError:
            self.send_error(404)
            return
        with f:
            st = os.fstat(f.fileno())
            size, start, end, status = st.st_size, 0, st.st_size - 1, 200
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
            if m and int(m.group(1)) < size:
                start, status = int(m.group(1)), 206
                end = min(int(m.group(2) or size - 1), size - 1)
            if self.delay:
                time.sleep(self.delay)
            self.send_response(status)
            self.send_header("content-length", str(end - start + 1))
            self.send_header("etag", f'"{st.st_mtime_ns:x}-{size:x}"')
            self.send_header("last-modified", self.date_time_string(int(st.st_mtime)))
            self.send_header("cache-control", "max-age=604800")
            self.send_header("accept-ranges", "bytes")
            if status == 206:
                self.send_header("content-range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "GET":
                self.wfile.flush()
                self.connection.sendfile(f, start, end - start + 1)


def serve_paced(port: int, root: str, rate: int, delay: float = 0.0) -> None:
    """Serve ``root`` on 127.0.0.1:``port``, each connection paced to ``rate`` B/s."""
    _PacedHandler.root = Path(root)
    _PacedHandler.rate = rate
    _PacedHandler.delay = delay
    http.server.ThreadingHTTPServer.daemon_threads = True
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), _PacedHandler) as server:
        server.serve_forever()


@attrs.define
class ThrottledProcs(Procs):
    """:class:`Procs` whose origin sends each connection at most ``rate`` bytes/s
    (a paced Python origin, see :func:`serve_paced`); 0 means the nginx origin."""

    rate: int = 0
    delay: float = 0.0

    def start_origin(self) -> None:
        if not self.rate:
            super().start_origin()
            return
        self.origin_port = free_port()
        argv = [sys.executable, "-m", "benchmarks.cold", "--serve-paced",
                str(self.origin_port), str(self.www), str(self.rate), str(self.delay)]  # fmt: skip
        # children start in the work directory: benchmarks/ is found through the path
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self._spawn("origin", argv, env=env)
        wait_http(self.origin_port, "/s0.bin")


@attrs.frozen
class Got:
    seconds: float  # request sent to last byte
    ttfb: float  # request sent to first body byte
    size: int
    digest: str


def get(port: int, path: str, range_: tuple[int, int] | None = None) -> Got:
    """One GET on a fresh connection; the body is hashed as it arrives."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        if range_ is not None:
            head += f"Range: bytes={range_[0]}-{range_[1]}\r\n"
        t0 = time.perf_counter()
        sock.sendall((head + "\r\n").encode())
        buf = bytearray(_BUFFER)
        view = memoryview(buf)
        got = b""
        while b"\r\n\r\n" not in got:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"{path}: closed before the head")
            got += view[:n]
        status_line, _, rest = got.partition(b"\r\n")
        fields, _, body = rest.partition(b"\r\n\r\n")
        status = int(status_line.split()[1])
        if status not in (200, 206):
            raise RuntimeError(f"{path}: status {status}")
        length = next(
            int(line.split(b":", 1)[1])
            for line in fields.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        hasher = blake3.blake3()
        hasher.update(body)
        received = len(body)
        ttfb = time.perf_counter() - t0 if received else 0.0
        while received < length:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"{path}: closed after {received} of {length} bytes")
            if not ttfb:
                ttfb = time.perf_counter() - t0
            hasher.update(view[:n])
            received += n
        return Got(time.perf_counter() - t0, ttfb, received, hasher.hexdigest())
    finally:
        sock.close()


def file_digest(path: Path, start: int = 0, length: int | None = None) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        f.seek(start)
        left = path.stat().st_size - start if length is None else length
        while left:
            chunk = f.read(min(left, 16 * MiB))
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class ColdRun:
    def __init__(
        self, procs: Procs, rounds: int, mcc_flags: list[str], baseline: Path | None = None
    ) -> None:
        self.p = procs
        self.rounds = rounds
        self.mcc_flags = mcc_flags
        self.baseline = baseline  # the tree "mcc-base" runs from

    @property
    def mccs(self) -> tuple[str, ...]:
        """The mcc targets to compare: this tree's, and the baseline's when given."""
        return ("mcc", "mcc-base") if self.baseline is not None else ("mcc",)

    def fresh(self, target: str) -> None:
        if target.startswith("mcc"):
            flags = self.mcc_flags + (_FIXED if target == "mcc-fixed" else [])
            self.p.stop("mcc")
            self.p.mcc_source = self.baseline if target == "mcc-base" else None
            try:
                self.p.start_mcc(fresh=True, extra=flags)
            except OSError:
                log = (self.p.work / "mcc.out").read_text(errors="replace")
                print(f"mcc did not start; the end of its log:\n{log[-3000:]}", flush=True)
                raise
        elif target == "nginx":
            self.p.stop("nginx")
            self.p.start_nginx_cache(fresh=True)

    def whole(self, name: str, targets: tuple[str, ...], path: str, digest: str) -> dict[str, Any]:
        """Whole-object GETs, each target cold, rounds interleaved."""

        def one(target: str) -> dict[str, float]:
            self.fresh(target)
            is_mcc = target.startswith("mcc")
            cpu0 = self.p.cpu_seconds("mcc") if is_mcc else 0.0
            got = get(self.p.port("mcc" if is_mcc else target), path)
            if got.digest != digest:
                raise SystemExit(f"{name}: {target} sent bytes that differ from the origin's")
            row = {"MBps": got.size / got.seconds / MB, "seconds": got.seconds}
            if is_mcc:
                row["cpu_s_per_GB"] = (self.p.cpu_seconds("mcc") - cpu0) / (got.size / 1e9)
            return row

        return self.side_by_side(name, one, targets)

    def ttfb(
        self, name: str, path: str, size: int, digests: Callable[[int], str]
    ) -> dict[str, Any]:
        """Time to first byte of a cold 1 MiB range (a different range every time)."""
        counter = iter(range(1, 1 << 20))

        def one(target: str) -> dict[str, float]:
            self.fresh(target)
            k = next(counter)
            start = (size // 2 + k * 7 * MiB + 12345) % (size - _RANGE)
            port = self.p.port("mcc" if target.startswith("mcc") else target)
            got = get(port, path, (start, start + _RANGE - 1))
            if got.digest != digests(start):
                raise SystemExit(f"cold range: {target} sent bytes that differ from the origin's")
            return {"ttfb_ms": got.ttfb * 1000, "last_ms": got.seconds * 1000}

        return self.side_by_side(name, one, ("origin", *self.mccs))

    def side_by_side(
        self, name: str, one: Callable[[str], dict[str, float]], targets: tuple[str, ...]
    ) -> dict[str, Any]:
        rows: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        for r in range(self.rounds):
            for target in targets if r % 2 == 0 else reversed(targets):
                rows[target].append(one(target))
                print(f"  {time.strftime('%H:%M:%S')} {name} round {r + 1} {target}: "
                      f"{_fmt(rows[target][-1])}", flush=True)  # fmt: skip
        out = {t: {k: _median([x[k] for x in xs]) for k in xs[0]} for t, xs in rows.items()}
        print(f"{name}: " + "; ".join(f"{t} {_fmt(v)}" for t, v in out.items()), flush=True)
        return out


def _vs_direct(res: dict[str, Any], key: str) -> None:
    """Each mcc's figure over going direct (``base_vs_direct``: the baseline's)."""
    res["mcc_vs_direct"] = res["mcc"][key] / res["origin"][key]
    if "mcc-base" in res:
        res["base_vs_direct"] = res["mcc-base"][key] / res["origin"][key]


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.1f}" for k, v in row.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold", description=__doc__)
    parser.add_argument("--size", default="1GiB", help="(b)/(c)'s object (default 1GiB)")
    parser.add_argument("--slow-size", default="120MB", help="(a)'s object (default 120MB)")
    parser.add_argument("--rate", default="20MB", help="(a)'s per-connection rate (20MB)")
    parser.add_argument("--delay", default="20ms", help="(d)'s origin delay (default 20ms)")
    parser.add_argument("--serve-paced", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="abcd", help="which of a, b, c, d to run")
    parser.add_argument("--work", default=None, help="work folder (default: a temp dir)")
    parser.add_argument("--baseline", default=None, help="another checkout to compare with")
    parser.add_argument("--mcc", nargs=argparse.REMAINDER, default=[], help="extra mcc flags")
    args = parser.parse_args(argv)
    if args.serve_paced:
        port, root, rate, delay = args.serve_paced
        serve_paced(int(port), root, int(rate), float(delay))
        return
    ensure_tools()
    baseline = Path(args.baseline).resolve() if args.baseline else None
    size, slow_size = parse_size(args.size), parse_size(args.slow_size)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="mcc-cold-", dir=args.work) as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user
        if "a" in args.only:
            slow_work = work / "slow"
            slow_work.mkdir()
            www = make_data(slow_work, slow_size, 1, 64 * 1024)
            digest = file_digest(www / "big.bin")
            with ThrottledProcs(slow_work, www, rate=parse_size(args.rate)) as p:
                p.start_mcc(fresh=True, extra=args.mcc)
                p.start_nginx_cache(fresh=True)
                run = ColdRun(p, args.rounds, args.mcc, baseline)
                name = f"(a) cold {slow_size / MB:.0f} MB, origin at {args.rate}/s per connection"
                targets = ("origin", *run.mccs, "mcc-fixed", "nginx")
                res = run.whole(name, targets, "/big.bin", digest)
                _vs_direct(res, "MBps")
                res["mcc_fixed_vs_direct"] = res["mcc-fixed"]["MBps"] / res["origin"]["MBps"]
                res["nginx_vs_direct"] = res["nginx"]["MBps"] / res["origin"]["MBps"]
                results["a"] = res
        if "b" in args.only or "c" in args.only:
            fast_work = work / "fast"
            fast_work.mkdir()
            www = make_data(fast_work, size, 1, 64 * 1024)
            with ThrottledProcs(fast_work, www) as p:
                p.start_mcc(fresh=True, extra=args.mcc)
                run = ColdRun(p, args.rounds, args.mcc, baseline)
                if "b" in args.only:
                    digest = file_digest(www / "big.bin")
                    name = f"(b) cold {size / MiB:.0f} MiB, unthrottled loopback"
                    res = run.whole(name, ("origin", *run.mccs), "/big.bin", digest)
                    _vs_direct(res, "MBps")
                    results["b"] = res
                if "c" in args.only:
                    name = "(c) cold 1 MiB range, time to first byte"
                    res = run.ttfb(
                        name, "/big.bin", size, lambda s: file_digest(www / "big.bin", s, _RANGE)
                    )
                    _vs_direct(res, "ttfb_ms")
                    results["c"] = res
        if "d" in args.only:
            wan_work = work / "wan"
            wan_work.mkdir()
            www = make_data(wan_work, slow_size, 1, 64 * 1024)
            delay = parse_duration(args.delay)
            with ThrottledProcs(wan_work, www, rate=parse_size(args.rate), delay=delay) as p:
                p.start_mcc(fresh=True, extra=args.mcc)
                run = ColdRun(p, args.rounds, args.mcc, baseline)
                name = f"(d) cold 1 MiB range, time to first byte, origin {args.delay} away"
                res = run.ttfb(
                    name, "/big.bin", slow_size, lambda s: file_digest(www / "big.bin", s, _RANGE)
                )
                _vs_direct(res, "ttfb_ms")
                results["d"] = res
    for part in "abcd":
        if part in results:
            print(f"{part}: mcc/direct {results[part]['mcc_vs_direct']:.2f}x", end="")
            if "base_vs_direct" in results[part]:
                print(f", mcc-base/direct {results[part]['base_vs_direct']:.2f}x", end="")
            if part == "a":
                print(f", mcc-fixed/direct {results[part]['mcc_fixed_vs_direct']:.2f}x", end="")
                print(f", nginx/direct {results[part]['nginx_vs_direct']:.2f}x", end="")
            print()
    out = HERE / "results" / "cold.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
