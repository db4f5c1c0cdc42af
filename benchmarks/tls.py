"""TLS hits beside plain hits: MB/s and mcc's CPU per byte.

    python -m benchmarks.tls [--size 64MiB] [--seconds 5] [--clients 4]

Starts the test origin (``fixtures/origin.py``) in this process and a real ``mcc serve``
with a plain and a TLS listener (a self-signed certificate made with ``openssl``),
warms one object, then has ``--clients`` trio clients fetch it whole, again and again,
for ``--seconds`` over each listener. Plain hits go out with sendfile(2); TLS hits are
read with pread and encrypted in mcc's process. Reports MB/s and mcc's CPU seconds per
GB served (from /proc), and writes ``benchmarks/results/tls.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from fixtures.origin import Origin
from mcc.units import parse_size

from .harness import cpu_seconds, fetch_whole, free_port

HERE = Path(__file__).parent
MB = 1_000_000


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("benchmarks.tls needs the openssl program (apt-get install openssl)")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def _load(
    port: int, target: str, size: int, clients: int, seconds: float, tls: ssl.SSLContext | None
) -> int:
    total = 0
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal total
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream: trio.abc.Stream = tcp
        if tls is not None:
            stream = trio.SSLStream(tcp, tls, server_hostname="127.0.0.1")
        async with stream:
            while trio.current_time() < deadline:
                total += await fetch_whole(stream, target, size)

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    return total


async def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.size
    async with trio.open_nursery() as nursery:
        origin = Origin()
        origin.put("/big.bin", random.Random(1).randbytes(size))
        await nursery.start(origin.serve)
        cert, key = _self_signed(work)
        port, tls_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "mcc", "serve", "--listen", f"127.0.0.1:{port}",
            "--listen-tls", f"127.0.0.1:{tls_port}", "--tls-cert", str(cert), "--tls-key",
            str(key), "--admin-listen", f"127.0.0.1:{free_port()}", "--cache-dir",
            str(work / "cache"), "--allow-origin", origin.authority, "--access-log", "",
            "--log-level", "warning",
        ]  # fmt: skip
        proc = await trio.lowlevel.open_process(argv)
        try:
            target = f"/big.bin?cacheHostOrigin={origin.authority}"
            with trio.fail_after(30):
                while True:
                    try:
                        await trio.sleep(0.1)
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                        break
                    except OSError:
                        continue
            async with stream:
                await fetch_whole(stream, target, size)  # warm: every block stored
            await trio.sleep(1)
            client_tls = ssl.create_default_context()
            client_tls.load_verify_locations(str(cert))
            rows: dict[str, Any] = {}
            for name, p, tls in (("plain", port, None), ("tls", tls_port, client_tls)):
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                served = await _load(p, target, size, args.clients, args.seconds, tls)
                cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
                rows[name] = {
                    "MB_per_s": round(served / wall / MB, 1),
                    "mcc_cpu_s_per_GB": round(cpu / (served / 1e9), 3),
                    "bytes": served,
                    "seconds": round(wall, 2),
                }
                print(
                    f"  {name:5} hits: {rows[name]['MB_per_s']:8.1f} MB/s, "
                    f"mcc CPU {rows[name]['mcc_cpu_s_per_GB']:.3f} s/GB "
                    f"({served / 1e9:.2f} GB in {wall:.1f} s)",
                    flush=True,
                )
            requests = len(origin.requests)
            rows["origin_requests_after_warm"] = requests
            return rows
        finally:
            proc.terminate()
            with trio.move_on_after(20):
                await proc.wait()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=64 * 1024 * 1024, help="object size")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per listener")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcc-bench-tls-") as tmp:
        rows = trio.run(_run, args, Path(tmp))
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "openssl": ssl.OPENSSL_VERSION,
        "size": args.size,
        "clients": args.clients,
        **rows,
    }
    out = HERE / "results" / "tls.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
