"""A node of several worker processes (``mcc serve --workers N``).

Theory of operation: the master process (no trio) does once what belongs to the
node, then forks the workers with :func:`mcc.ops.supervisor.supervise`:

1. it takes the cache directories' locks (the workers inherit them: no other
   node can open the cache while any of its workers runs);
2. it opens the store once (the index made or migrated before any worker opens
   it) and removes what a crash left in ``tmp/`` and ``fills/`` (no worker runs
   yet, so nothing there is live);
3. it binds the listeners (:mod:`mcc.ops.sockets`: each client listener once per
   worker with ``SO_REUSEPORT``, the admin listener once, for worker 0);
4. it makes the shared counter slots (:mod:`mcc.ops.totals`).

Each worker then runs :func:`~mcc.http.run.run_server` as a single node does, on a
:class:`~mcc.store.shared.SharedStore` (fills shared through claims:
:mod:`mcc.engine.claimed`); worker 0 also serves the admin API with node totals,
and the first start of worker 0 reconciles the index with the blob files. SIGTERM
to the master drains every worker; SIGHUP is forwarded (each worker reloads); a
worker that dies is started again in its slot.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..engine.opening import drive_infos
from ..ops.accesslog import configure_logging
from ..ops.slots import CounterSlots
from ..ops.sockets import Bound, adopt, bind
from ..ops.supervisor import supervise
from ..ops.totals import summed_keys
from ..store.claims import sweep_fills
from ..store.lock import lock_drives
from ..store.store import Store
from .run import WorkerRole, raise_fd_limit, run_server

__all__ = ["STARTS", "run_workers"]

log = logging.getLogger("mcc.http")

# the slot counter of how often a worker was started (its first start recovers)
STARTS = "worker_starts"


def run_workers(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run ``config.workers`` worker processes as one node until SIGTERM/SIGINT;
    returns the master's exit status.

    Args:
      config: the config to start with.
      load: reads the config again on SIGHUP (in each worker).

    Raises:
      CacheLocked: another process uses a cache directory.
    """
    configure_logging(config)
    raise_fd_limit()
    n = config.workers
    with lock_drives(Path(d.path) for d in config.drives):
        drives = drive_infos(config.drives)
        # made (or migrated) once, before any worker opens it; temp files swept
        store = Store(drives, block_size=config.block_size, durable=config.durable)
        temps = store.recovery.temp_files
        store.close()
        fills = sweep_fills(drives)
        try:
            per_worker, admin = _bind(config, n)
        except OSError as exc:
            log.error("cannot start: %s", exc.strerror)
            return 1
        admin_port = next(iter(admin.values()))[0].getsockname()[1]
        slots = CounterSlots([*summed_keys(), STARTS], n)
        log.info(
            "master (pid %d): starting %d workers; removed %d temp files and %d fill "
            "files left by a crash",
            os.getpid(),
            n,
            temps,
            fills,
        )

        def run_worker(index: int) -> int:
            adopt({**per_worker[index], **(admin if index == 0 else {})})
            slot = slots.slot(index)
            first = slot.get(STARTS) == 0
            slot.add(STARTS)
            role = WorkerRole(index, slots, index == 0 and first, admin_port)
            return run_server(config, load, role)

        try:
            return supervise(n, run_worker)
        finally:
            for sockets in [*per_worker, admin]:
                for socks in sockets.values():
                    for s in socks:
                        s.close()


def _bind(config: Config, workers: int) -> tuple[list[Bound], Bound]:
    """Every client listener once per worker, and the admin listener once.

    Raises:
      OSError: an address cannot be bound (the message names it).
    """
    per_worker: list[Bound] = [{} for _ in range(workers)]
    admin: Bound = {}
    opened: list[socket.socket] = []
    try:
        for addr in (*config.listen, *config.listen_tls):
            copies = bind(addr.host, addr.port, workers)
            for index, socks in enumerate(copies):
                per_worker[index][(addr.host, addr.port)] = socks
                opened += socks
        a = config.admin_listen
        admin[(a.host, a.port)] = bind(a.host, a.port)[0]
    except OSError:
        for s in opened:
            s.close()
        raise
    return per_worker, admin
