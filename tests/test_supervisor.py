"""The master and its workers (mcc/ops/supervisor.py): workers share the master's
listening socket, a worker killed with SIGKILL is started again in its slot, and
SIGTERM to the master ends every worker cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mcc.ops.supervisor import supervise

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
CONNECTS = 20


def _ask(port: int) -> tuple[int, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        data = b""
        for _ in range(100):  # bounded: the answer is one short line
            got = s.recv(100)
            if not got:
                break
            data += got
    index, pid = data.split()
    return int(index), int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_share_the_socket_are_restarted_and_drain_on_sigterm() -> None:
    argv = [sys.executable, "-m", "tests.supervise_child", str(WORKERS)]
    master = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert master.stdout is not None
    try:
        port = int(master.stdout.readline().split()[1])
        workers: dict[int, int] = {}
        for _ in range(WORKERS):
            _, slot, started = master.stdout.readline().split()
            workers[int(slot)] = int(started)
        assert sorted(workers) == list(range(WORKERS))
        for _ in range(CONNECTS):  # every answer comes from one of the workers
            index, pid = _ask(port)
            assert workers[index] == pid
        os.kill(workers[1], signal.SIGKILL)
        _, slot, started = master.stdout.readline().split()
        assert int(slot) == 1 and int(started) != workers[1]
        workers[1] = int(started)
        for _ in range(CONNECTS):
            index, pid = _ask(port)
            assert workers[index] == pid
        master.send_signal(signal.SIGTERM)
        assert master.wait(timeout=60) == 0
        assert not any(_alive(pid) for pid in workers.values())
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(timeout=60)
        master.stdout.close()


def test_zero_workers_is_refused() -> None:
    with pytest.raises(ValueError):
        supervise(0, lambda index: 0)


def _broken_worker(index: int) -> int:
    raise RuntimeError(f"worker {index} cannot start")


def test_workers_dying_at_start_stop_the_master_instead_of_spinning() -> None:
    # forks this process: each child leaves at once through os._exit
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert supervise(WORKERS, _broken_worker) == 1
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # given back
