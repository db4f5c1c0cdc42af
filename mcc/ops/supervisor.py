"""A master process that runs N worker processes and keeps them running.

``mcc serve --workers N`` runs it (:mod:`mcc.http.workers`): the workers of a node
share the master's listening sockets (bound once, before the fork, so the kernel
spreads accepts over every worker: :mod:`mcc.ops.sockets`), its cache directory
lock (an inherited fd) and its shared memory (:mod:`mcc.ops.slots`).

Theory of operation: the master runs no trio (a trio run must not cross a fork). It
blocks SIGTERM, SIGINT, SIGHUP and SIGCHLD and takes them one at a time with ``sigtimedwait``
(reaping also every :data:`_REAP_EVERY` seconds, so a SIGCHLD taken by another thread
of the process is not waited for forever):

- SIGCHLD: reap every child that ended; one that ended while the node runs is
  started again in the same slot, unless workers keep dying at start (more than
  :data:`MAX_QUICK_DEATHS` in a row within :data:`QUICK_DEATH_SECONDS` of their start),
  when the master stops the others and returns 1 rather than spin;
- SIGHUP: forward it to every worker (each reloads as a single node does);
- SIGTERM or SIGINT: forward SIGTERM to every worker (each drains as a single node
  does) and wait for them all; the master's exit status is 0 when every worker
  ended cleanly.

A worker starts with the signal mask and handlers as they were before the master
blocked them, and leaves with ``os._exit`` (never returning into the master's code).
A worker that SIGTERM ends before it set up its handler counts as stopped cleanly.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

__all__ = ["MAX_QUICK_DEATHS", "QUICK_DEATH_SECONDS", "supervise"]

# a worker that dies within this many seconds of its start "died at start"
QUICK_DEATH_SECONDS = 1.0
# this many such deaths in a row mean a broken setup, not bad luck: stop
MAX_QUICK_DEATHS = 5
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
# the master also reaps on this period without a signal: another thread of its
# process (not blocking SIGCHLD) may have taken the signal meant for it
_REAP_EVERY = 0.5


def supervise(workers: int, run_worker: Callable[[int], int]) -> int:
    """Run ``run_worker(index)`` in ``workers`` forked processes until SIGTERM or
    SIGINT; returns the exit status for the master.

    Args:
      workers: how many worker processes (at least 1).
      run_worker: a worker's body; it returns the worker's exit status.

    Raises:
      ValueError: ``workers`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers: at least 1, got {workers}")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    # SIGCHLD is ignored by default: give it a handler so that it is queued for us
    old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)
    running: dict[int, tuple[int, float]] = {}  # pid -> (slot, start time)

    def start(index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, old_chld)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                code = run_worker(index)
            except BaseException as exc:  # a worker never returns into the master
                sys.stderr.write(f"mcc: worker {index} failed: {exc!r}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        running[pid] = (index, time.monotonic())

    try:
        for index in range(workers):
            start(index)
        return _watch(running, start)
    finally:
        for pid in running:
            _signal(pid, signal.SIGKILL)
        for pid in list(running):
            _wait(pid)
        # mask first, handler last: a SIGCHLD another thread took while ours was set
        # is run by ours (Python runs handlers late, in the main thread; one found
        # tripped after SIG_DFL is back is an OSError "ignored due to race condition")
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        signal.signal(signal.SIGCHLD, old_chld)


def _watch(running: dict[int, tuple[int, float]], start: Callable[[int], None]) -> int:
    quick_deaths = 0
    while True:
        info = signal.sigtimedwait(_SIGNALS, _REAP_EVERY)
        if info is not None and info.si_signo == signal.SIGHUP:
            for pid in running:
                _signal(pid, signal.SIGHUP)
            continue
        if info is not None and info.si_signo != signal.SIGCHLD:
            return _stop(running)
        ended = [(pid, running.pop(pid)) for pid in _reap(running)]
        for _pid, (index, started) in ended:
            if time.monotonic() - started < QUICK_DEATH_SECONDS:
                quick_deaths += 1
                if quick_deaths > MAX_QUICK_DEATHS:
                    sys.stderr.write("mcc: workers keep dying at start: stopping\n")
                    _stop(running)
                    return 1
            else:
                quick_deaths = 0
            start(index)


def _reap(running: dict[int, tuple[int, float]]) -> list[int]:
    """Every worker that ended, without blocking."""
    ended = []
    for _ in range(len(running)):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in running:
            ended.append(pid)
    return ended


def _stop(running: dict[int, tuple[int, float]]) -> int:
    """SIGTERM every worker and wait for each; 0 when all ended with status 0."""
    for pid in running:
        _signal(pid, signal.SIGTERM)
    worst = 0
    for pid in list(running):
        code = _wait(pid)
        running.pop(pid)
        if code == -signal.SIGTERM:  # ended by our SIGTERM before it could catch it
            code = 0
        worst = worst or (code if code > 0 else 1 if code < 0 else 0)
    return worst


def _wait(pid: int) -> int:
    """Wait for one worker; its exit code (negative: the signal that ended it)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped already
        return 0
    return os.waitstatus_to_exitcode(status)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
