"""Memory stays bounded under clients that do not read (``limits.max_buffer_memory``):
fills go to their block files, not to RAM, and the memory comes back afterwards.
The full-size run with figures is ``python -m benchmarks.memory``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trio

from benchmarks.harness import rss_bytes
from benchmarks.memory import hold_clients
from fixtures.origin import Origin
from tests.helpers import free_port, serve_argv, wait_serving

MiB = 1024 * 1024
CLIENTS = 100
BUDGET = 16 * MiB
# what one open connection costs on its own (h11 state, its tasks, and the receive
# buffers of its fetches as glibc's heap keeps them until the next trim), measured
# at 135-950 KiB; a fill buffered in RAM would cost each client its read-ahead (4
# blocks of 1 MiB) on top
PER_CONNECTION = 1024 * 1024


async def test_non_reading_clients_keep_rss_within_the_budget(
    origin: Origin, tmp_path: Path
) -> None:
    origin.put("/big", os.urandom(24 * MiB))
    port = free_port()
    argv = serve_argv(
        port, tmp_path / "c", origin.authority,
        "--block-size", "1MiB", "--max-buffer-memory", str(BUDGET), "--log-level", "warning",
    )  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        await wait_serving(port)
        before = rss_bytes(proc.pid)
        targets = [f"{origin.url('/big')}?client={i}" for i in range(CLIENTS)]
        alive, peak = await hold_clients(port, targets, 3.0, lambda: rss_bytes(proc.pid))
        assert alive == CLIENTS  # held open, not cut
        # each client's object would hold several 1 MiB blocks in RAM without the budget
        assert peak - before < BUDGET + CLIENTS * PER_CONNECTION, (before, peak)
        low = peak
        # orphaned fills run on after their clients leave (max_orphan_flights), and
        # the heap is trimmed every few seconds: give both time
        with trio.move_on_after(25):
            while low - before > BUDGET:
                await trio.sleep(0.25)
                low = min(low, rss_bytes(proc.pid))
        assert low - before <= BUDGET, (before, peak, low)
        # and the node still serves
        await wait_serving(port)
    finally:
        proc.terminate()
        await proc.wait()
