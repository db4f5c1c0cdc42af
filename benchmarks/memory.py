"""Memory under clients that do not read: RSS stays within the fill budget.

    python -m benchmarks.memory [--clients 320] [--size 64MiB] [--budget 64MiB] [--hold 15]

Starts an nginx origin serving one large file and ``mcc serve`` with
``--max-buffer-memory BUDGET``. Then ``CLIENTS`` clients each ask for a distinct
object (the same file under its own query string, so every one is its own cache
entry and its own fill) and read nothing. mcc fills into block files on disk rather
than into RAM, so its resident set should grow by no more than the budget plus a
fixed per-connection cost, and come back down once the clients leave.

Prints mcc's RSS before, at its peak while the clients hold, and after they left,
next to the budget, and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from mcc.units import format_size, parse_size

from .harness import MiB, Procs, ensure_tools, make_data, rss_bytes

HERE = Path(__file__).parent


async def hold_clients(
    port: int,
    targets: list[str],
    hold: float,
    sample: Callable[[], int],
    host: str = "",
) -> tuple[int, int]:
    """Open one connection per target, send a GET for it, read nothing for ``hold``
    seconds while sampling ``sample()`` every 0.25 s, then close them all.

    Returns (connections that were open to the end, the largest sample seen)."""
    streams: list[trio.SocketStream] = []
    try:
        for target in targets:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            head = f"GET {target} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n\r\n"
            await stream.send_all(head.encode())
        peak = sample()
        deadline = trio.current_time() + hold
        while trio.current_time() < deadline:
            await trio.sleep(0.25)
            peak = max(peak, sample())
        alive = 0
        for stream in streams:
            # a connection the server cut has its EOF or an error queued; one still
            # open has (part of) a response waiting, or nothing yet
            try:
                with trio.move_on_after(0.01):
                    data = await stream.receive_some(1)
                    if not data:
                        continue
                alive += 1
            except (trio.BrokenResourceError, OSError):
                continue
        return alive, peak
    finally:
        for stream in streams:
            await stream.aclose()


def settle(sample: Callable[[], int], seconds: float) -> int:
    """The smallest of ``sample()`` over ``seconds`` (memory comes back gradually)."""
    low = sample()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.25)
        low = min(low, sample())
    return low


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=320)
    ap.add_argument("--size", default="64MiB", help="size of each object")
    ap.add_argument("--budget", default="64MiB", help="mcc's --max-buffer-memory")
    ap.add_argument("--hold", type=float, default=15.0, help="seconds the clients hold")
    args = ap.parse_args()
    ensure_tools()
    size, budget = parse_size(args.size), parse_size(args.budget)
    with tempfile.TemporaryDirectory(prefix="mcc-mem-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx's workers run as another user
        www = make_data(work, size, 1, 4096)
        with Procs(work=work, www=www) as procs:
            procs.start_mcc(fresh=True, extra=["--max-buffer-memory", str(budget)])
            pid = procs.pid("mcc")

            def sample() -> int:
                return rss_bytes(pid)

            before = settle(sample, 1.0)
            targets = [f"/big.bin?client={i}" for i in range(args.clients)]
            alive, peak = trio.run(hold_clients, procs.mcc_port, targets, args.hold, sample)
            after = settle(sample, 12.0)
    row = {
        "clients": args.clients,
        "object_size": size,
        "budget": budget,
        "rss_before": before,
        "rss_peak": peak,
        "rss_after": after,
        "connections_open_at_end": alive,
        "peak_over_before": peak - before,
    }
    print(
        f"{args.clients} non-reading clients of distinct {format_size(size)} objects, "
        f"max_buffer_memory {format_size(budget)}:\n"
        f"  mcc RSS before {before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB "
        f"(+{(peak - before) / MiB:.1f} MiB = {(peak - before) / budget:.2f}x the budget), "
        f"after {after / MiB:.1f} MiB; {alive}/{args.clients} connections still open"
    )
    out = HERE / "results" / "memory.json"
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
