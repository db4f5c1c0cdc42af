"""The shared generation counter (mcc/store/generation.py): bumps from several
processes and threads at once are all counted, and every process sees them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mcc.store.generation import GENERATION_NAME, Generation

PROCS = 4
BUMPS = 20000  # enough for the processes to overlap on 2 busy cores
CHILD = """
import sys
from pathlib import Path
from mcc.store.generation import Generation
g = Generation(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    g.bump()
g.close()
"""


def test_bumps_from_many_processes_all_count(tmp_path: Path) -> None:
    watcher = Generation(tmp_path)
    seen = watcher.current()
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(BUMPS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCS)
    ]
    for k in kids:
        assert k.stdout is not None and k.stdout.readline().strip() == "ready"
    for k in kids:  # all at once, so that the bumps interleave
        assert k.stdin is not None
        k.stdin.write("go\n")
        k.stdin.flush()
    for k in kids:
        k.communicate(timeout=60)
        assert k.returncode == 0
    assert watcher.moved(seen)
    assert watcher.current() == seen + PROCS * BUMPS
    watcher.close()


def test_bumps_from_threads_of_one_process_all_count(tmp_path: Path) -> None:
    gen = Generation(tmp_path)
    threads = [
        threading.Thread(target=lambda: [gen.bump() for _ in range(BUMPS)]) for _ in range(PROCS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert gen.current() == PROCS * BUMPS
    gen.close()


def test_a_reopened_counter_keeps_its_value_and_a_short_file_starts_at_zero(
    tmp_path: Path,
) -> None:
    (tmp_path / GENERATION_NAME).write_bytes(b"\x07")  # torn or planted: too short
    gen = Generation(tmp_path)
    assert gen.current() == 7  # the bytes there are kept, the rest zero-filled
    assert (gen.bump(), gen.bump()) == (8, 9)
    gen.close()
    gen.close()  # twice is harmless
    again = Generation(tmp_path)
    assert again.current() == 9 and not again.moved(9)
    again.close()


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(outside, cache / GENERATION_NAME)
    with pytest.raises(OSError):
        Generation(cache)
    assert outside.read_bytes() == b"keep"
