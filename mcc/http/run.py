"""Running a node: the engine, the client server and the admin API in one trio run,
until SIGTERM or SIGINT (drain) with SIGHUP reloading (see :mod:`mcc.ops.daemon`)."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import trio

from ..config import Config
from ..engine.opening import open_cache
from ..memory import freeze_startup_objects, periodic_trim
from ..ops.accesslog import configure_logging
from ..ops.admin import AdminServer
from ..ops.daemon import banner, reload
from .server import Server

__all__ = ["run_server"]

log = logging.getLogger("mcc.http")


async def _main(config: Config, load: Callable[[], Config] | None = None) -> int:
    async with open_cache(config) as cache:
        server = Server(config, cache)
        async with trio.open_nursery() as nursery:
            admin = AdminServer(cache, server.metrics, lambda: server.open_connections)
            try:
                ports = await nursery.start(server.serve)
                admin_port = server.admin_port = await nursery.start(admin.serve)
            except OSError as exc:
                sys.stderr.write(f"mcc: {exc.strerror}\n")
                nursery.cancel_scope.cancel()
                return 1
            nursery.start_soon(periodic_trim)
            freeze_startup_objects()  # no full GC pass walks them under load
            stored = [cache.store.stored_bytes_on(i) for i in range(len(config.drives))]
            for line in banner(config, ports + server.tls_ports, admin_port, stored):
                log.info("%s", line)
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


def _raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (as nginx's worker_rlimit_nofile):
    every client connection, upstream connection and blob being sent holds an fd."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def run_server(config: Config, load: Callable[[], Config] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status.

    Args:
      config: the config to start with.
      load: reads the config again on SIGHUP (the same file and flags); without it,
        SIGHUP only reopens the logs.

    Raises:
      CacheLocked: another process uses a cache directory.
    """
    configure_logging(config)
    _raise_fd_limit()
    try:
        return trio.run(_main, config, load)
    except OSError as exc:
        sys.stderr.write(f"mcc: cannot start: {exc}\n")
        return 1
