"""The tables of the configuration: ``[timeouts]``, ``[freshness]`` and ``[limits]``
(each key declared once, as in :mod:`mcc.config.model`)."""

from __future__ import annotations

import attrs

from .knobs import knob

__all__ = ["Freshness", "Limits", "Timeouts"]


@attrs.frozen
class Timeouts:
    """Every time limit, in seconds."""

    connect: float = knob(
        10.0, flag="--connect-timeout", unit="duration", help="upstream connect timeout"
    )
    read: float = knob(
        30.0,
        flag="--read-timeout",
        unit="duration",
        help="longest upstream silence while waiting for bytes",
        doc="longest upstream silence while waiting for bytes (block fetches: `stall`, "
        "when shorter)",
    )
    request_head: float = knob(
        10.0,
        flag="--request-head-timeout",
        unit="duration",
        help="time a client has to send a whole request head (slowloris)",
    )
    keepalive: float = knob(
        75.0,
        flag="--keepalive-timeout",
        unit="duration",
        help="idle time allowed between requests on one client connection",
    )
    send: float = knob(
        60.0,
        flag="--send-timeout",
        unit="duration",
        help="longest time one chunk of a response may take to reach a client",
        doc="time one 256 KiB piece of a response may take to reach a client",
    )
    shutdown_grace: float = knob(
        10.0,
        flag="--shutdown-grace",
        unit="duration",
        help="on SIGTERM, time in-flight responses get to finish",
    )
    parent_backoff: float = knob(
        30.0, flag="--parent-backoff", unit="duration", help="how long a failed parent is skipped"
    )
    # the progress guard (mcc.upstream.progress tells why these defaults)
    stall: float = knob(
        5.0,
        flag="--stall-timeout",
        unit="duration",
        help="longest upstream silence in a block fetch before it moves to the next route",
        doc="progress guard: longest upstream silence in a block fetch (head or body) "
        "before it moves to the next route",
    )
    min_rate: int = knob(
        4000,
        flag="--min-rate",
        metavar="BYTES_PER_S",
        help="bytes/s floor of a block fetch over --min-rate-window (0: none)",
        doc="bytes/s floor of a block fetch, judged over `min_rate_window`; below it the "
        "fetch moves to the next route (`0`: no floor)",
    )
    min_rate_window: float = knob(
        8.0,
        flag="--min-rate-window",
        unit="duration",
        help="the window over which --min-rate is judged",
        doc="progress guard: the window `min_rate` is judged over",
    )
    # below the shortest common origin keep-alive timeouts (Apache httpd, Node.js: 5 s)
    pool_idle: float = knob(
        4.0,
        flag="--pool-idle-timeout",
        unit="duration",
        help="an idle pooled upstream connection older than this is closed, not reused",
        doc="an idle pooled upstream connection older than this is closed, not reused "
        "(below the 5 s keep-alive of Apache httpd and Node.js, the shortest common "
        "origin defaults)",
    )


@attrs.frozen
class Freshness:
    """How long stored responses are used without asking upstream (RFC 9111 s4.2)."""

    heuristic_max: float = knob(
        86400.0,
        flag="--heuristic-max",
        unit="duration",
        help="cap of the heuristic freshness lifetime (10% of the time since Last-Modified)",
    )
    max_stale: float = knob(
        86400.0,
        flag="--max-stale",
        unit="duration",
        help="serve a stale copy this long past its lifetime when upstream fails",
        doc="stale-if-error: how long past its lifetime a stored copy may stand in when "
        "upstream fails",
    )


@attrs.frozen
class Limits:
    """Every size and count limit."""

    max_connections: int = knob(
        4096,
        flag="--max-connections",
        metavar="N",
        help="concurrent client connections; more get 503",
    )
    max_request_head: int = knob(
        16 * 1024,  # RFC 9110 s5.4: we answer 431 beyond this
        flag="--max-request-head",
        unit="size",
        help="largest request head accepted; larger gets 431",
    )
    max_ranges: int = knob(
        32,
        flag="--max-ranges",
        metavar="N",
        help="ranges per request; more are answered with the whole object",
    )
    upstream_retries: int = knob(
        2,
        flag="--upstream-retries",
        metavar="N",
        help="extra tries of a failed block fetch (resuming where it broke)",
    )
    upstream_connections_per_host: int = knob(
        16,
        flag="--upstream-connections-per-host",
        metavar="N",
        help="fills in flight per origin host (more wait), and idle keep-alive connections kept",
        doc="block fetches and discoveries in flight per origin host at once (more wait), "
        "and idle upstream keep-alive connections kept (0: no pooling and no cap)",
    )
    max_orphan_flights: int = knob(
        16,
        flag="--max-orphan-flights",
        metavar="N",
        help="fetches that keep going after every client left",
    )
    max_upstream_fetches: int = knob(
        256,
        flag="--max-upstream-fetches",
        metavar="N",
        help="upstream requests in flight at once; more wait their turn",
    )
    max_misses_per_client: int = knob(
        64,
        flag="--max-misses-per-client",
        metavar="N",
        help="concurrent misses one client address may cause; more get 503",
    )
    max_buffer_memory: int = knob(
        256 * 1024 * 1024,
        flag="--max-buffer-memory",
        unit="size",
        help="RAM all fills together may hold (receive buffers; blocks a full drive cannot take)",
        doc="RAM all fills together may hold: one 256 KiB receive buffer per fetch, and "
        "blocks kept in memory when their drive cannot take them; fills wait for it, a "
        "block that finds none fails",
    )
    scrub_rate: int = knob(
        4 * 1024 * 1024,
        flag="--scrub-rate",
        unit="size",
        help="bytes/s the background scrub re-hashes stored blobs at (0: off)",
    )
    max_variants: int = knob(
        8,
        flag="--max-variants",
        metavar="N",
        help="variants stored per URL when responses vary (Vary); more are forwarded unstored",
        doc="variants stored per URL when responses vary on request fields (`Vary`, RFC "
        "9111 section 4.1); requests for more variants are forwarded unstored; `0` stores "
        "no varying response",
    )
    max_parallel_fetches: int = knob(
        8,
        flag="--max-parallel-fetches",
        metavar="N",
        help="upstream fetches one sequential reader may have in flight (read-ahead grows to it)",
        doc="upstream fetches one sequential reader may have in flight: read-ahead starts "
        "at `readahead_blocks` and grows while the reader waits on upstream and more "
        "connections bring blocks faster (never beyond this, nor "
        "`upstream_connections_per_host`); once it stops growing, each fetch covers up "
        "to 8 consecutive blocks (8 MiB at most)",
    )
