"""Running a node: the engine, the client server and the admin API in one trio run,
until SIGTERM or SIGINT (drain) with SIGHUP reloading (see :mod:`mcc.ops.daemon`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import attrs
import trio

from ..config import Config
from ..engine.engine import Cache
from ..engine.opening import open_cache, open_shared_cache
from ..memory import freeze_startup_objects, periodic_trim
from ..ops.accesslog import configure_logging
from ..ops.admin import AdminServer
from ..ops.collector import NodeCollector
from ..ops.daemon import banner, reload
from ..ops.slots import CounterSlots
from ..ops.totals import NodeAdmin, Publisher
from .server import Server

__all__ = ["WorkerRole", "raise_fd_limit", "run_server"]

log = logging.getLogger("mcc.http")


@attrs.frozen
class WorkerRole:
    """What makes a worker of a node of several (``--workers``, :mod:`.workers`).

    Attributes:
      index: the worker's number (0 serves the admin API).
      slots: every worker's counters (:mod:`mcc.ops.totals`).
      recover: reconcile index and blob files at start (the first start of worker 0).
      admin_port: the admin API's bound port (named in ``/health`` answers).
    """

    index: int
    slots: CounterSlots
    recover: bool
    admin_port: int


async def _main(
    config: Config, load: Callable[[], Config] | None = None, worker: WorkerRole | None = None
) -> int:
    opened = (
        open_cache(config) if worker is None else open_shared_cache(config, recover=worker.recover)
    )
    async with opened as cache:
        server = Server(config, cache)
        async with trio.open_nursery() as nursery:
            admin = _admin(cache, server, worker)
            try:
                ports = await nursery.start(server.serve)
                admin_port = worker.admin_port if worker is not None else 0
                if admin is not None:
                    admin_port = await nursery.start(admin.serve)
                server.admin_port = admin_port
            except OSError as exc:
                sys.stderr.write(f"mcc: {exc.strerror}\n")
                nursery.cancel_scope.cancel()
                return 1
            nursery.start_soon(periodic_trim)
            if worker is not None:
                own = NodeCollector(cache, server.metrics, lambda: server.open_connections)
                nursery.start_soon(Publisher(worker.slots.slot(worker.index), own).run)
            freeze_startup_objects()  # no full GC pass walks them under load
            if worker is None or worker.index == 0:
                stored = [cache.store.stored_bytes_on(i) for i in range(len(config.drives))]
                for line in banner(config, ports + server.tls_ports, admin_port, stored):
                    log.info("%s", line)
            else:
                log.info("worker %d (pid %d) serving", worker.index, os.getpid())
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("got SIGHUP: reopening logs and rereading the config")
                        config = reload(config, load, [cache, server])
                        continue
                    log.info(
                        "got %s: draining (grace %.0fs)",
                        signal.Signals(signum).name,
                        config.timeouts.shutdown_grace,
                    )
                    server.drain()
                    break
            # the server task ends once drained; the admin listener goes with it
            await server.wait_stopped()
            nursery.cancel_scope.cancel()
    return 0


def _admin(cache: Cache, server: Server, worker: WorkerRole | None) -> AdminServer | None:
    """The admin API: the node's own, worker 0's with node totals, or none."""
    if worker is None:
        return AdminServer(cache, server.metrics, lambda: server.open_connections)
    if worker.index == 0:
        return NodeAdmin(cache, server.metrics, lambda: server.open_connections, worker.slots)
    return None


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (as nginx's worker_rlimit_nofile):
    every client connection, upstream connection and blob being sent holds an fd."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def run_server(
    config: Config, load: Callable[[], Config] | None = None, worker: WorkerRole | None = None
) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status.

    Args:
      config: the config to start with.
      load: reads the config again on SIGHUP (the same file and flags); without it,
        SIGHUP only reopens the logs.
      worker: run as this worker of a node of several (:mod:`.workers`).

    Raises:
      CacheLocked: another process uses a cache directory.
    """
    configure_logging(config)
    raise_fd_limit()
    try:
        return trio.run(_main, config, load, worker)
    except OSError as exc:
        sys.stderr.write(f"mcc: cannot start: {exc}\n")
        return 1
