"""The checks a config's types cannot express: ranges, pairs of keys, URLs and names.

Each problem is one line, ``key: value reason``, as :class:`~mcc.errors.ConfigError`
reports it.
"""

from __future__ import annotations

import attrs

from ..origins import OriginPolicy, normalize_host
from .model import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, Config, Timeouts, url_authority

__all__ = ["check_config"]

# The least value of each limit that leaves the node working.
_LIMIT_FLOORS = (
    ("max_connections", 1),
    ("max_request_head", 1024),
    ("max_ranges", 1),
    ("upstream_retries", 0),
    ("upstream_connections_per_host", 0),
    ("max_orphan_flights", 0),
    ("max_upstream_fetches", 1),
    ("max_misses_per_client", 1),
    ("max_buffer_memory", 4 * 1024 * 1024),
    ("max_variants", 0),
    ("scrub_rate", 0),
    ("max_parallel_fetches", 1),
)


def check_config(config: Config) -> list[str]:
    """Semantic checks the types cannot express; returns one line per problem."""
    problems: list[str] = []
    b = config.block_size
    if b & (b - 1) or not MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE:
        problems.append(f"block_size: {b} is not a power of two between 64 KiB and 64 MiB")
    if config.admin_token and len(config.admin_token) < 16:
        problems.append("admin_token: must be at least 16 characters (or empty for none)")
    if not config.admin_token and config.admin_listen.host not in ("127.0.0.1", "::1", "localhost"):
        problems.append(
            f"admin_token: required when admin_listen ({config.admin_listen}) is not on loopback"
        )
    if not config.listen:
        problems.append("listen: at least one address is needed")
    if config.listen_tls and (config.tls_cert is None or config.tls_key is None):
        problems.append("listen_tls: needs tls_cert and tls_key (PEM files)")
    if config.upstream_proxy is not None and config.upstream_proxy.port == 0:
        problems.append(f"upstream_proxy: {config.upstream_proxy} needs a real port")
    problems += _check_drives(config)
    if not 0 <= config.readahead_blocks <= 64:
        problems.append(f"readahead_blocks: {config.readahead_blocks} is not between 0 and 64")
    if config.commit_batch < 1:
        problems.append(f"commit_batch: {config.commit_batch} is less than 1")
    if not 1 <= config.workers <= 1024:
        problems.append(f"workers: {config.workers} is not between 1 and 1024")
    if not 0 <= config.commit_interval <= 1:
        problems.append(f"commit_interval: {config.commit_interval}s is not between 0s and 1s")
    problems += _check_hosts(config)
    if not config.node_id or not all(c.isalnum() or c in "-_.:" for c in config.node_id):
        problems.append(
            f"node_id: {config.node_id!r} must be letters, digits, '-', '_', '.' or ':'"
            " (a Via token)"
        )
    for name in attrs.fields_dict(Timeouts):
        value = getattr(config.timeouts, name)
        if name == "min_rate" and value < 0:  # (0: no floor)
            problems.append(f"timeouts.{name}: {value} must not be negative")
        elif name != "min_rate" and value <= 0:
            problems.append(f"timeouts.{name}: {value} must be more than zero")
    for i, rule in enumerate(config.refresh_patterns):
        if not rule.match:
            problems.append(f"refresh_patterns[{i}].match: must not be empty")
        if rule.immutable and (rule.max_age is not None or rule.min_age is not None):
            problems.append(f"refresh_patterns[{i}]: immutable excludes max_age and min_age")
    lim = config.limits
    for name, low in _LIMIT_FLOORS:
        if getattr(lim, name) < low:
            problems.append(f"limits.{name}: {getattr(lim, name)} is less than {low}")
    return problems


def _check_drives(config: Config) -> list[str]:
    problems: list[str] = []
    if not config.drives:
        problems.append("drives: at least one cache drive is needed")
    paths = [d.path.resolve() for d in config.drives]
    if len(set(paths)) != len(paths):
        problems.append("drives: the same folder is named twice")
    b = config.block_size
    for i, d in enumerate(config.drives):
        if d.max_size < 16 * b:
            problems.append(
                f"drives[{i}].max_size: {d.max_size} is smaller than 16 blocks ({16 * b})"
            )
    return problems


def _check_hosts(config: Config) -> list[str]:
    problems: list[str] = []
    for i, pattern in enumerate(config.allow_origins):
        try:
            OriginPolicy.build([pattern])
        except ValueError as exc:
            problems.append(f"allow_origins[{i}]: {exc}")
    for host, canon in config.canonical_hosts.items():
        try:
            normalize_host(host)
            normalize_host(canon)
        except ValueError as exc:
            problems.append(f"canonical_hosts.{host}: {exc}")
    for key, urls in (
        ("origin", [config.origin] if config.origin else []),
        ("parents", config.parents),
        ("peers", config.peers),
    ):
        for i, url in enumerate(urls):
            where = key if key == "origin" else f"{key}[{i}]"
            problem = _check_http_url(url)
            if problem:
                problems.append(f"{where}: {url!r} {problem}")
    return problems


def _check_http_url(url: str) -> str | None:
    if not url.startswith(("http://", "https://")):
        return "is not an http:// or https:// URL"
    try:
        url_authority(url)
    except ValueError as exc:
        return f"has a bad host: {exc}"
    return None
