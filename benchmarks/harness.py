"""The processes a benchmark needs: an nginx origin, the nginx slice cache (baseline),
mcc, and the load generators (wrk, curl, a trio client for coalescing).

Everything listens on 127.0.0.1 and is started and stopped by this module.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

__all__ = [
    "Procs",
    "WrkResult",
    "cpu_seconds",
    "ensure_tools",
    "free_port",
    "loop_lag_between",
    "loop_lag_buckets",
    "make_data",
    "rss_bytes",
    "run_wrk",
]

HERE = Path(__file__).parent
MiB = 1024 * 1024


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def ensure_tools() -> None:
    """Install nginx, wrk and curl with apt-get when missing (needs root)."""
    missing = [t for t in ("nginx", "wrk", "curl") if shutil.which(t) is None]
    if os.path.exists("/usr/sbin/nginx") and "nginx" in missing:
        missing.remove("nginx")
    if not missing:
        return
    packages = {"nginx": "nginx-light", "wrk": "wrk", "curl": "curl"}
    print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *(packages[m] for m in missing)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def make_data(work: Path, big_size: int, small_count: int, small_size: int) -> Path:
    """Create the origin's files once (random bytes, so nothing compresses)."""
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    big = www / "big.bin"
    if not big.exists() or big.stat().st_size != big_size:
        print(f"writing {big_size // MiB} MiB of random data ...", flush=True)
        with open(big, "wb") as f:
            left = big_size
            while left:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n
    for i in range(small_count):
        p = www / f"s{i}.bin"
        if not p.exists() or p.stat().st_size != small_size:
            p.write_bytes(os.urandom(small_size))
    return www


_ORIGIN_CONF = """
worker_processes 1;
daemon off;
error_log {work}/origin.err warn;
pid {work}/origin.pid;
events {{ worker_connections 8192; }}
http {{
  access_log {work}/origin.access.log;
  sendfile on; tcp_nopush off; aio off;
  keepalive_requests 100000;
  # update CDNs send long lifetimes; without one both caches would revalidate
  server {{ listen 127.0.0.1:{port}; root {www}; expires 7d; }}
}}
"""

# The lancache-style baseline: proxy_cache + slice 1m + proxy_cache_lock, one worker,
# with tcp_nopush and aio off (both cost a lot on loopback: see shared/perf-notes.md).
_NGINX_CACHE_CONF = """
worker_processes {workers};
daemon off;
error_log {work}/nginx-cache.err warn;
pid {work}/nginx-cache.pid;
events {{ worker_connections 8192; }}
http {{
  {access_log}
  sendfile on; tcp_nopush off; aio off;
  keepalive_requests 100000;
  proxy_cache_path {cache} levels=1:2 keys_zone=c:64m max_size=40g inactive=7d
                   use_temp_path=off;
  upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      slice 1m;
      proxy_cache c;
      proxy_cache_key $uri$slice_range;
      proxy_set_header Range $slice_range;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache_valid 200 206 7d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 1h;
      proxy_pass http://origin;
    }}
  }}
}}
"""


@attrs.define
class Procs:
    """The running servers; use as a context manager."""

    work: Path
    www: Path
    origin_port: int = 0
    nginx_port: int = 0
    mcc_port: int = 0
    mcc_admin: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    mcc_workers: int = 1
    mcc_source: Path | None = None  # another checkout's tree to run mcc from (before/after)
    access_logs: bool = False  # both caches write access logs (nginx buffered, as mcc)

    def __enter__(self) -> Procs:
        self.start_origin()
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.work / f"{name}.out", "ab") as log:  # the child keeps its own copy
            # cwd: the work directory, so that "-m mcc" imports the installed mcc (or
            # mcc_source's), not whatever checkout is the current directory
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=log, cwd=self.work, env=env
            )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM if name != "mcc" else signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_origin(self) -> None:
        self.origin_port = free_port()
        conf = self.work / "origin.conf"
        conf.write_text(_ORIGIN_CONF.format(work=self.work, port=self.origin_port, www=self.www))
        self._spawn("origin", [nginx_bin(), "-c", str(conf), "-p", str(self.work)])
        probe = "/" + min(p.name for p in self.www.iterdir())
        wait_http(self.origin_port, probe)

    def origin_requests(self, path: str) -> int:
        """Requests for ``path`` in the origin's access log so far."""
        log = self.work / "origin.access.log"
        if not log.exists():
            return 0
        needle = f" {path} ".encode()
        return sum(1 for line in log.read_bytes().splitlines() if needle in line)

    def start_nginx_cache(self, fresh: bool = False) -> None:
        cache = self.work / "nginx-cache"
        if fresh and cache.exists():
            shutil.rmtree(cache)
        cache.mkdir(exist_ok=True)
        self.nginx_port = free_port()
        conf = self.work / "nginx-cache.conf"
        conf.write_text(
            _NGINX_CACHE_CONF.format(
                work=self.work,
                cache=cache,
                port=self.nginx_port,
                origin_port=self.origin_port,
                workers=self.mcc_workers,  # as many processes as mcc serves with
                access_log=(
                    f"access_log {self.work}/nginx-access.log combined buffer=64k flush=1s;"
                    if self.access_logs
                    else "access_log off;"
                ),
            )
        )
        self._spawn("nginx", [nginx_bin(), "-c", str(conf), "-p", str(self.work)])
        wait_http(self.nginx_port, "/s0.bin")

    def start_mcc(self, fresh: bool = False, extra: Sequence[str] = ()) -> None:
        cache = self.work / "mcc-cache"
        if fresh and cache.exists():
            shutil.rmtree(cache)
        self.mcc_port, self.mcc_admin = free_port(), free_port()
        log = str(self.work / "mcc-access.log") if self.access_logs else ""
        argv = [
            sys.executable, "-m", "mcc", "serve",
            "--listen", f"127.0.0.1:{self.mcc_port}",
            "--admin-listen", f"127.0.0.1:{self.mcc_admin}",
            "--origin", f"http://127.0.0.1:{self.origin_port}",
            "--allow-origin", f"127.0.0.1:{self.origin_port}",
            "--cache-dir", str(cache), "--max-size", "40GiB", "--min-free", "1GiB",
            "--block-size", "1MiB", "--access-log", log, "--log-level", "warning", *extra,
        ]  # fmt: skip
        if self.mcc_workers > 1:  # (a checkout from before --workers knows no such flag)
            argv += ["--workers", str(self.mcc_workers)]
        env = dict(os.environ)
        if self.mcc_source is not None:  # its mcc/ comes first on the import path
            env["PYTHONPATH"] = str(self.mcc_source)
        self._spawn("mcc", argv, env)
        wait_http(self.mcc_port, "/s0.bin")

    def pid(self, name: str) -> int:
        """The pid doing the work: nginx's worker (the master only supervises)."""
        proc = self.procs[name]
        if name in ("nginx", "origin"):
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if children:
                return int(children[0])
        return proc.pid

    def pids(self, name: str) -> list[int]:
        """Every process doing the work: nginx's workers (not the master), or mcc's
        process and its children (worker processes, when it has them)."""
        proc = self.procs[name]
        children = [
            int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        if name in ("nginx", "origin"):
            return children or [proc.pid]
        return [proc.pid, *children]

    def cpu_seconds(self, name: str) -> float:
        """CPU seconds used so far by every process of ``name`` (see :meth:`pids`)."""
        return sum(cpu_seconds(pid) for pid in self.pids(name))

    def port(self, name: str) -> int:
        return {"mcc": self.mcc_port, "nginx": self.nginx_port, "origin": self.origin_port}[name]


def wait_http(port: int, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                r.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@attrs.frozen
class WrkResult:
    requests_per_s: float
    bytes_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    factor = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]
    return float(m.group(1)) * factor


def run_wrk(
    port: int,
    path: str,
    connections: int,
    seconds: float,
    script: str | None = None,
    env: dict[str, str] | None = None,
    threads: int = 2,
) -> WrkResult:
    """Run wrk against 127.0.0.1:port and parse its summary."""
    argv = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--latency", "--timeout", "30s",
    ]  # fmt: skip
    if script:
        argv += ["-s", str(HERE / "lua" / script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    tm = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert tm is not None, out
    bps = float(tm.group(1)) * _UNITS[tm.group(2)]
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(
        rps, bps, _ms(p50.group(1)) if p50 else float("nan"),
        _ms(p99.group(1)) if p99 else float("nan"), errors,
    )  # fmt: skip


def loop_lag_buckets(admin_port: int) -> list[tuple[float, float]]:
    """mcc's cumulative loop-lag histogram now: (upper bound in s, batches)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = r'^mcc_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    return [(float(le), float(n)) for le, n in re.findall(pattern, text, re.M)]


def loop_lag_between(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> tuple[float, float]:
    """p99 and maximum of the loop lag between two scrapes, in ms, each as the upper
    bound of its histogram bucket (inf when past the last bound; nan with no data)."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0
    if not total:
        return float("nan"), float("nan")
    rank = math.ceil(0.99 * total)
    p99 = next(le for le, n in counts if n >= rank)
    top = next(le for le, n in counts if n >= total)
    return p99 * 1000, top * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def fetch_whole(stream: trio.abc.Stream, target: str, size: int, close: bool = False) -> int:
    """One whole GET of ``size`` bytes on ``stream`` (kept alive unless ``close``);
    returns the body's length. The body is counted, not parsed or kept."""
    extra = "Connection: close\r\n" if close else ""
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("connection closed before the head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head[:100].decode("latin-1"))
    got = len(body)
    while got < size:
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise RuntimeError(f"connection closed mid-body ({got} of {size})")
        got += len(chunk)
    return got
