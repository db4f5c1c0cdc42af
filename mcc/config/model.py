"""The configuration's shape: frozen attrs classes, one field per key.

Every key is declared once, here, with its flag, help text and unit (see
:mod:`mcc.config.knobs`); flags win over the file, which wins over these defaults.
Reading and writing TOML is :mod:`mcc.config.convert`, the checks the types cannot
express are :mod:`mcc.config.check`.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import attrs

from ..origins import DEFAULT_ALLOW_ORIGINS, OriginPolicy, split_host_port
from ..policy import RefreshRule
from .knobs import knob, section
from .tables import Freshness, Limits, Timeouts

__all__ = ["Config", "Drive", "Freshness", "HostPort", "Limits", "Timeouts"]

# RFC 9110 leaves block size to us. 64 KiB keeps per-block overhead (one index row,
# one file, one upstream request) small next to the data; 64 MiB bounds the memory a
# block in flight may buffer.
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 64 * 1024 * 1024

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
AccessLogFormat = Literal["kv", "combined", "json"]
VerifyMode = Literal["always", "first", "never"]


@attrs.frozen
class HostPort:
    """A listening or connecting address, written ``host:port`` (IPv6 in brackets)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Raises ValueError naming the text when it is not ``host:port``."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not a 'host:port' string")
        host, port = split_host_port(text, default_port=-1, allow_zero=True)
        if port < 0:
            raise ValueError(f"{text!r} has no port (write host:port)")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class Drive:
    """One cache drive: a folder, the most it may hold, and the free space to leave."""

    path: Path = knob(
        flag="--cache-dir",
        kind="drive_dirs",
        metavar="DIR",
        help="cache drive folder (repeatable; replaces the config's drives)",
        doc="a cache drive folder",
        default_doc="`mcc-cache`",
    )
    max_size: int = knob(
        50 * 1024**3,
        flag="--max-size",
        kind="each_drive",
        unit="size",
        help="most each cache drive may hold, e.g. 50GiB or 800MB",
        doc="most the drive may hold",
    )
    min_free: int = knob(
        1024**3,
        flag="--min-free",
        kind="each_drive",
        unit="size",
        help="free space to leave on each cache drive's filesystem",
        doc="free space to leave on its filesystem",
    )


def _default_node_id(config: Config) -> str:
    """The host name plus the first listen port (``host:8080``): unique per instance,
    so two nodes on one host (a parent and its child) do not take each other's Via
    token for a forwarding loop."""
    host = socket.gethostname().split(".")[0] or "mcc"
    return f"{host}:{config.listen[0].port}" if config.listen else host


@attrs.frozen
class Config:
    """The whole configuration of one mcc node. Defaults are the embedded config."""

    listen: tuple[HostPort, ...] = knob(
        (HostPort("127.0.0.1", 8080),),
        flag="--listen",
        kind="append",
        metavar="HOST:PORT",
        help="address to serve clients on (repeatable)",
        doc="client listeners (IPv6 as `[::1]:8080`)",
    )
    listen_tls: tuple[HostPort, ...] = knob(
        (),
        flag="--listen-tls",
        kind="append",
        metavar="HOST:PORT",
        help="address to serve clients on over TLS (repeatable; needs --tls-cert and --tls-key)",
        doc="client listeners speaking HTTP/1.1 over TLS",
    )
    tls_cert: Path | None = knob(
        None,
        flag="--tls-cert",
        metavar="FILE",
        help="certificate chain (PEM) of the TLS listeners (needed with listen_tls)",
    )
    tls_key: Path | None = knob(
        None, flag="--tls-key", metavar="FILE", help="private key (PEM) of the TLS listeners"
    )
    admin_listen: HostPort = knob(
        HostPort("127.0.0.1", 8081),
        flag="--admin-listen",
        metavar="HOST:PORT",
        help="address of the admin API and status page",
    )
    admin_token: str = knob(
        "",
        flag="--admin-token",
        metavar="TOKEN",
        help="bearer token for the admin API's write endpoints (all endpoints off loopback)",
        doc="bearer token (16+ chars) for the admin write endpoints; for all endpoints off "
        "loopback, where it is required",
    )
    drives: tuple[Drive, ...] = section(Drive, (Drive(Path("mcc-cache")),), array=True)
    block_size: int = knob(
        1024 * 1024,
        flag="--block-size",
        unit="size",
        help="cache block size, a power of two from 64KiB to 64MiB",
    )
    readahead_blocks: int = knob(
        4,
        flag="--readahead-blocks",
        metavar="N",
        help="blocks a sequential reader keeps in flight ahead of itself at first (0-64; 0: off)",
        doc="blocks kept in flight ahead of a sequential reader to start with (0-64; 0 "
        "turns read-ahead off; it grows up to `max_parallel_fetches`)",
    )
    allow_origins: tuple[str, ...] = knob(
        DEFAULT_ALLOW_ORIGINS,
        flag="--allow-origin",
        kind="append",
        metavar="PATTERN",
        help="origin host to serve: host, host:port or *.suffix (repeatable; replaces the "
        "default list)",
        doc="`host`, `host:port` or `*.suffix`; without a port, 80 and 443 only; `https://` "
        "before any of them fetches the host over TLS when a request names only the host",
        default_doc="Connected Cache content endpoints (`mcc/origins.py`)",
    )
    canonical_hosts: Mapping[str, str] = knob(
        flag="--canonical-host",
        kind="pairs",
        metavar="HOST=CANONICAL",
        factory=dict,
        help="file a mirror host's objects under a canonical name (repeatable)",
        doc="mirror host -> name its objects are filed under (mirrors share entries; the "
        "mirror is allowed)",
    )
    origin: str | None = knob(
        None,
        flag="--origin",
        metavar="URL",
        help="default upstream for requests that name no origin (reverse-proxy use)",
        doc="default upstream for requests naming no origin (`http://` or `https://`)",
    )
    parents: tuple[str, ...] = knob(
        (),
        flag="--parent",
        kind="append",
        metavar="URL",
        help="parent cache to fetch misses from, tried in order (repeatable)",
        doc="parent caches, tried in order (`http://` or `https://`)",
    )
    peers: tuple[str, ...] = knob(
        (),
        flag="--peer",
        kind="append",
        metavar="URL",
        help="another node of this cluster; blocks it owns are fetched from it (repeatable)",
        doc="the nodes of this node's cluster, itself included or not; each block is fetched "
        'by its owner (see "Several nodes")',
    )
    upstream_proxy: HostPort | None = knob(
        None,
        flag="--upstream-proxy",
        metavar="HOST:PORT",
        help="send all upstream traffic through this HTTP proxy",
        doc="HTTP proxy for all upstream traffic (https objects through `CONNECT`)",
    )
    upstream_ca_file: Path | None = knob(
        None,
        flag="--upstream-ca-file",
        metavar="FILE",
        help="extra CA certificates (PEM) trusted for https origins and parents",
        doc="extra PEM CA certificates trusted for https origins and parents, beside the "
        "system store",
    )
    origin_fallback: bool = knob(
        True,
        flag="--no-origin-fallback",
        kind="off",
        help="never go to the origin directly when every parent is down",
        doc="go to the origin when every parent is down",
    )
    node_id: str = knob(
        attrs.Factory(_default_node_id, takes_self=True),
        flag="--node-id",
        metavar="NAME",
        help="this node's name, used in Via and Cache-Status",
        default_doc="host name and first listen port (`host:8080`)",
        doc="this node's name in `Via` and `Cache-Status`; unique per instance, so nodes "
        "on one host never take each other for a loop",
    )
    log_level: LogLevel = knob(
        "info",
        flag="--log-level",
        help="least severe log level written",
        doc="`debug`, `info`, `warning`, `error`",
    )
    log_format: LogFormat = knob(
        "text",
        flag="--log-format",
        help="logs as key=value text or one JSON object per line; the access log has its "
        "own --access-log-format",
        doc="`text` (key=value) or `json` (one object per line)",
    )
    access_log: str = knob(
        "-",
        flag="--access-log",
        metavar="PATH",
        help="access log file, '-' for standard error, '' for none",
        doc=(
            'access log file; `-` standard error; `""` off. Lines are buffered and written'
            " at most 0.25 s after the response (or per 64 KiB), and on SIGHUP and shutdown"
        ),
    )
    access_log_format: AccessLogFormat = knob(
        "kv",
        flag="--access-log-format",
        help="access log lines as key=value pairs, the Apache/nginx combined format, or JSON",
        doc="`kv` (`time= client= method= url= range= status= bytes= cache= duration_ms=`), "
        '`combined` (Apache/nginx combined: `%h %l %u %t "%r" %>s %b "%{Referer}i" '
        '"%{User-Agent}i"`) or `json` (the `kv` fields as one object per line)',
    )
    verify_on_read: VerifyMode = knob(
        "first",
        flag="--verify-on-read",
        help="check blobs against their digest when read",
        doc="check blobs against their digest: `always`, `first` read after start, `never`",
    )
    timeouts: Timeouts = section(Timeouts, Timeouts())
    limits: Limits = section(Limits, Limits())
    freshness: Freshness = section(Freshness, Freshness())
    refresh_patterns: tuple[RefreshRule, ...] = knob(
        (),
        flag="--refresh-pattern",
        kind="rules",
        metavar="PATTERN=SPEC",
        help="freshness override: SPEC is 'immutable' or 'max_age=5m[,min_age=30s]' (repeatable)",
        doc="per-URL lifetime overrides (fnmatch on the URL or its path), like Squid's "
        "refresh_pattern: `*.deb` immutable, `*/InRelease` at most 5 min; tried before the "
        "[default refresh rules](#default-refresh-rules); each is a `[[refresh_patterns]]` "
        "table of `match`, `max_age`, `min_age`, `immutable`",
        default_doc="none (the shipped defaults apply)",
    )
    durable: bool = knob(
        True,
        flag="--no-durable",
        kind="off",
        help="skip the fsyncs that make stored blocks survive a power loss (benchmarks)",
        doc="a stored block survives a power loss: blob, folder and index fsynced before "
        'the index calls it stored (see "Durability"); `false` skips the fsyncs '
        "(benchmarks, throw-away caches)",
    )
    commit_interval: float = knob(
        0.002,
        flag="--commit-interval",
        unit="duration",
        help="group commit: longest a stored block waits for others to share its fsyncs (0s-1s)",
        doc="group commit: longest a completed block waits for others to share its fsyncs "
        "(`0s`: flush at once; blocks completed meanwhile form the next batch)",
    )
    commit_batch: int = knob(
        64,
        flag="--commit-batch",
        metavar="N",
        help="group commit: most blocks made durable together",
        doc="group commit: most blocks made durable together; a full batch goes without waiting",
    )
    workers: int = knob(
        1,
        flag="--workers",
        metavar="N",
        help="worker processes serving as one node (1 to 1024; the master binds the "
        "listeners and restarts a worker that dies)",
        doc="worker processes serving as one node: they share the listeners (bound once by "
        "a master process), the cache directory, one upstream fetch per block and one set "
        'of counters; the admin API is served by worker 0 (see "Several workers")',
    )

    def origin_policy(self) -> OriginPolicy:
        """The compiled allowlist (``--origin``'s host is allowed too)."""
        patterns = list(self.allow_origins)
        if self.origin:
            https = self.origin.lower().startswith("https://")
            patterns.append(("https://" if https else "") + url_authority(self.origin))
        return OriginPolicy.build(patterns, self.canonical_hosts)


def url_authority(url: str) -> str:
    """``host:port`` of an http(s) URL, the port filled in. Raises ValueError."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0]
    default = 443 if url.lower().startswith("https://") else 80
    host, port = split_host_port(authority, default_port=default)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
