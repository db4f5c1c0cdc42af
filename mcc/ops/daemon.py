"""Running as a service: the start-up banner and reloading on SIGHUP.

Theory of operation: on SIGHUP the server calls :func:`reload`, which reopens the
log files (so that logrotate can rename them) and reads the config again the way
it was read at start (the same ``--config`` file, the same flags on top). A config
with problems is refused, one log line per problem, and the old one stays in
force. Otherwise the keys that can change live are handed to every part through
its ``reconfigure(config)`` method: they apply to the next request, while
responses and fetches under way finish as they started. The keys in
:data:`FIXED_KEYS` (sockets, the store's layout, the node's name in ``Via``) cannot
change under a running server: a change to them is named in one log line and left
as it was until a restart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from .._version import __version__
from ..config import Config
from ..errors import ConfigError
from ..units import human_size
from .accesslog import configure_logging

__all__ = ["FIXED_KEYS", "Reconfigurable", "banner", "reload"]

log = logging.getLogger("mcc.daemon")

# Keys a reload leaves as they were: listeners are bound, the drives' paths and sizes
# place every blob (rendezvous hashing), the block size shapes every stored object,
# and the node id is this node's Via token in its children's loop detection.
FIXED_KEYS = (
    "listen",
    "listen_tls",
    "admin_listen",
    "drives",
    "block_size",
    "node_id",
    "workers",
)
# Allowlist entries named in the banner before "and N more".
_BANNER_PATTERNS = 4


class Reconfigurable(Protocol):
    """A part of the running node that takes a reloaded config."""

    def reconfigure(self, config: Config) -> None: ...


def reload(
    current: Config, load: Callable[[], Config] | None, parts: Sequence[Reconfigurable]
) -> Config:
    """Reopen the logs and reread the config (SIGHUP); see the module docstring.

    Args:
      current: the config in force.
      load: reads the config as at start (file and flags); None when there is
        nothing to reread (an embedder's config): then only the logs are reopened.
      parts: everything that takes the new config, each through ``reconfigure``.

    Returns:
      The config in force afterwards: the new one (with :data:`FIXED_KEYS` kept),
      or ``current`` when the new one was refused.
    """
    try:
        new = load() if load is not None else current
    except ConfigError as exc:
        _reopen_logs(current)
        for line in exc.problems:
            log.error("reload refused: %s", line)
        log.error("reload refused: the config in force stays (%d problems)", len(exc.problems))
        return current
    fixed = [k for k in FIXED_KEYS if getattr(new, k) != getattr(current, k)]
    merged = attrs.evolve(new, **{k: getattr(current, k) for k in fixed})
    try:
        configure_logging(merged)
    except OSError as exc:
        _reopen_logs(current)
        log.error("reload refused: access_log: cannot open %r: %s", merged.access_log, exc)
        return current
    if fixed:
        log.warning(
            "reload: %s cannot change while running; kept as they were (restart to apply)",
            ", ".join(fixed),
        )
    for part in parts:
        part.reconfigure(merged)
    changed = [
        f.name for f in attrs.fields(Config) if getattr(merged, f.name) != getattr(current, f.name)
    ]
    log.info("reloaded: logs reopened; changed: %s", ", ".join(changed) or "nothing")
    return merged


def _reopen_logs(config: Config) -> None:
    try:
        configure_logging(config)
    except OSError as exc:
        log.error("cannot reopen the access log %r: %s", config.access_log, exc)


def banner(
    config: Config,
    ports: Sequence[int],
    admin_port: int,
    stored: Sequence[int],
) -> list[str]:
    """The start-up log lines: listeners, admin API, drives, allowlist, upstreams.

    Args:
      config: the config in force.
      ports: the bound client ports (they differ from ``listen`` for port 0).
      admin_port: the bound admin port.
      stored: bytes stored on each drive.
    """
    listen = ", ".join([str(a) for a in config.listen] + [f"{a} (TLS)" for a in config.listen_tls])
    if any(a.port == 0 for a in config.listen):
        listen += f" (ports {', '.join(map(str, ports))})"
    admin = config.admin_listen
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    lines = [
        f"mcc {__version__} (pid {os.getpid()}, node {config.node_id}) serving clients on {listen}",
        f"admin API and status page on http://{host}:{admin_port}/"
        + (" (token required for writes)" if config.admin_token else ""),
    ]
    for d, n in zip(config.drives, stored, strict=True):
        lines.append(
            f"cache drive {d.path}: {human_size(n)} stored of {human_size(d.max_size)} "
            f"(keeps {human_size(d.min_free)} free)"
        )
    patterns = list(config.allow_origins)
    shown = ", ".join(patterns[:_BANNER_PATTERNS])
    if len(patterns) > _BANNER_PATTERNS:
        shown += f" and {len(patterns) - _BANNER_PATTERNS} more"
    lines.append(f"allowlist: {len(patterns)} origin patterns ({shown or 'none'})")
    if config.origin:
        lines.append(f"requests naming no origin go to {config.origin}")
    if config.parents:
        tail = "" if config.origin_fallback else "; never the origin directly"
        lines.append(f"parents, tried in order: {', '.join(config.parents)}{tail}")
    else:
        lines.append("parents: none configured, misses go to the origin")
    if config.upstream_proxy is not None:
        lines.append(f"upstream traffic goes through the proxy {config.upstream_proxy}")
    return lines
