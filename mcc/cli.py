"""The ``mcc`` command line: ``serve`` and ``config show``.

Every config key has a flag (the table :data:`FLAGS`); flags win over the file.
Problems with the config or flags print one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import Config, config_to_toml, load_config
from .errors import ConfigError, McError
from .units import human_size

__all__ = ["FLAGS", "main"]

EXIT_USAGE = 2

# (flag, config key with dots for tables, argparse options, help)
FLAGS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    (
        "--listen",
        "listen",
        {"action": "append", "metavar": "HOST:PORT"},
        "address to serve clients on (repeatable; default 127.0.0.1:8080)",
    ),
    (
        "--listen-tls",
        "listen_tls",
        {"action": "append", "metavar": "HOST:PORT"},
        "address to serve clients on over TLS (repeatable; needs --tls-cert and --tls-key)",
    ),
    (
        "--tls-cert",
        "tls_cert",
        {"metavar": "FILE"},
        "certificate chain (PEM) of the TLS listeners",
    ),
    ("--tls-key", "tls_key", {"metavar": "FILE"}, "private key (PEM) of the TLS listeners"),
    (
        "--admin-listen",
        "admin_listen",
        {"metavar": "HOST:PORT"},
        "address of the admin API and status page (default 127.0.0.1:8081)",
    ),
    (
        "--admin-token",
        "admin_token",
        {"metavar": "TOKEN"},
        "bearer token for the admin API's write endpoints (all endpoints off loopback)",
    ),
    (
        "--block-size",
        "block_size",
        {"metavar": "SIZE"},
        "cache block size, a power of two from 64KiB to 64MiB (default 1MiB)",
    ),
    (
        "--readahead-blocks",
        "readahead_blocks",
        {"type": int, "metavar": "N"},
        "blocks a sequential reader keeps in flight ahead of itself (default 4)",
    ),
    (
        "--allow-origin",
        "allow_origins",
        {"action": "append", "metavar": "PATTERN"},
        "origin host to serve: host, host:port or *.suffix (repeatable; replaces the default list)",
    ),
    (
        "--origin",
        "origin",
        {"metavar": "URL"},
        "default upstream for requests that name no origin (reverse-proxy use)",
    ),
    (
        "--parent",
        "parents",
        {"action": "append", "metavar": "URL"},
        "parent cache to fetch misses from, tried in order (repeatable)",
    ),
    (
        "--peer",
        "peers",
        {"action": "append", "metavar": "URL"},
        "another node of this cluster; blocks it owns are fetched from it (repeatable)",
    ),
    (
        "--upstream-proxy",
        "upstream_proxy",
        {"metavar": "HOST:PORT"},
        "send all upstream traffic through this HTTP proxy",
    ),
    (
        "--upstream-ca-file",
        "upstream_ca_file",
        {"metavar": "FILE"},
        "extra CA certificates (PEM) trusted for https origins and parents",
    ),
    (
        "--node-id",
        "node_id",
        {"metavar": "NAME"},
        "this node's name, used in Via and Cache-Status (default: the host name)",
    ),
    (
        "--log-level",
        "log_level",
        {"choices": ["debug", "info", "warning", "error"]},
        "least severe log level written (default info)",
    ),
    (
        "--log-format",
        "log_format",
        {"choices": ["text", "json"]},
        "logs as key=value text or one JSON object per line (default text); "
        "the access log has its own --access-log-format",
    ),
    (
        "--access-log",
        "access_log",
        {"metavar": "PATH"},
        "access log file, '-' for standard error, '' for none (default -)",
    ),
    (
        "--access-log-format",
        "access_log_format",
        {"choices": ["kv", "combined", "json"]},
        "access log lines as key=value pairs, the Apache/nginx combined format, "
        "or JSON (default kv)",
    ),
    (
        "--verify-on-read",
        "verify_on_read",
        {"choices": ["always", "first", "never"]},
        "check blobs against their digest when read (default first)",
    ),
    (
        "--commit-interval",
        "commit_interval",
        {"metavar": "DURATION"},
        "group commit: longest a stored block waits for others to share its fsyncs (default 2ms)",
    ),
    (
        "--commit-batch",
        "commit_batch",
        {"type": int, "metavar": "N"},
        "group commit: most blocks made durable together (default 64)",
    ),
    (
        "--heuristic-max",
        "freshness.heuristic_max",
        {"metavar": "DURATION"},
        "cap of the heuristic freshness lifetime (10%% of the time since Last-Modified)",
    ),
    (
        "--max-stale",
        "freshness.max_stale",
        {"metavar": "DURATION"},
        "serve a stale copy this long past its lifetime when upstream fails",
    ),
    ("--connect-timeout", "timeouts.connect", {"metavar": "DURATION"}, "upstream connect timeout"),
    (
        "--read-timeout",
        "timeouts.read",
        {"metavar": "DURATION"},
        "longest upstream silence while waiting for bytes",
    ),
    (
        "--request-head-timeout",
        "timeouts.request_head",
        {"metavar": "DURATION"},
        "time a client has to send a whole request head",
    ),
    (
        "--keepalive-timeout",
        "timeouts.keepalive",
        {"metavar": "DURATION"},
        "idle time allowed between requests on one client connection",
    ),
    (
        "--send-timeout",
        "timeouts.send",
        {"metavar": "DURATION"},
        "longest time one chunk of a response may take to reach a client",
    ),
    (
        "--shutdown-grace",
        "timeouts.shutdown_grace",
        {"metavar": "DURATION"},
        "on SIGTERM, time in-flight responses get to finish",
    ),
    (
        "--parent-backoff",
        "timeouts.parent_backoff",
        {"metavar": "DURATION"},
        "how long a failed parent is skipped",
    ),
    (
        "--max-connections",
        "limits.max_connections",
        {"type": int, "metavar": "N"},
        "concurrent client connections; more get 503",
    ),
    (
        "--max-request-head",
        "limits.max_request_head",
        {"metavar": "SIZE"},
        "largest request head accepted; larger gets 431",
    ),
    (
        "--max-buffer-memory",
        "limits.max_buffer_memory",
        {"metavar": "SIZE"},
        "RAM all fills together may hold (receive buffers; blocks a full drive cannot take)",
    ),
    (
        "--max-ranges",
        "limits.max_ranges",
        {"type": int, "metavar": "N"},
        "ranges per request; more are answered with the whole object",
    ),
    (
        "--upstream-retries",
        "limits.upstream_retries",
        {"type": int, "metavar": "N"},
        "extra tries of a failed block fetch",
    ),
    (
        "--upstream-connections-per-host",
        "limits.upstream_connections_per_host",
        {"type": int, "metavar": "N"},
        "idle keep-alive connections kept per upstream",
    ),
    (
        "--max-upstream-fetches",
        "limits.max_upstream_fetches",
        {"type": int, "metavar": "N"},
        "upstream requests in flight at once; more wait their turn",
    ),
    (
        "--max-misses-per-client",
        "limits.max_misses_per_client",
        {"type": int, "metavar": "N"},
        "concurrent misses one client address may cause; more get 503",
    ),
    (
        "--max-orphan-flights",
        "limits.max_orphan_flights",
        {"type": int, "metavar": "N"},
        "fetches that keep going after every client left",
    ),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        sys.stderr.write(f"mcc: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="FILE", help="TOML config file")
    for flag, key, options, text in FLAGS:
        p.add_argument(flag, dest="cfg:" + key, help=text, **options)
    p.add_argument(
        "--cache-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="cache drive folder (repeatable; replaces the config's drives)",
    )
    p.add_argument(
        "--max-size", metavar="SIZE", help="most each cache drive may hold, e.g. 50GiB or 800MB"
    )
    p.add_argument(
        "--min-free", metavar="SIZE", help="free space to leave on each cache drive's filesystem"
    )
    p.add_argument(
        "--canonical-host",
        action="append",
        metavar="HOST=CANONICAL",
        help="file a mirror host's objects under a canonical name (repeatable)",
    )
    p.add_argument(
        "--refresh-pattern",
        action="append",
        metavar="PATTERN=SPEC",
        help="freshness override: SPEC is 'immutable' or 'max_age=5m[,min_age=30s]' (repeatable)",
    )
    p.add_argument(
        "--no-origin-fallback",
        action="store_true",
        default=None,
        help="never go to the origin directly when every parent is down",
    )
    p.add_argument(
        "--no-durable",
        action="store_true",
        default=None,
        help="skip the fsyncs that make stored blocks survive a power loss (benchmarks)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(args).items():
        if not name.startswith("cfg:") or value is None:
            continue
        key = name[4:]
        if "." in key:
            table, sub = key.split(".")
            out.setdefault(table, {})[sub] = value
        else:
            out[key] = value
    if args.no_origin_fallback:
        out["origin_fallback"] = False
    if args.no_durable:
        out["durable"] = False
    if args.refresh_pattern:
        out["refresh_patterns"] = [_refresh_rule(item) for item in args.refresh_pattern]
    if args.canonical_host:
        pairs = {}
        for item in args.canonical_host:
            host, sep, canon = item.partition("=")
            if not sep:
                raise ConfigError([f"canonical_hosts: {item!r} is not HOST=CANONICAL"])
            pairs[host] = canon
        out["canonical_hosts"] = pairs
    return out


def _refresh_rule(item: str) -> dict[str, Any]:
    """``*.deb=immutable`` or ``*/InRelease=max_age=5m,min_age=30s`` -> a rule table."""
    match, sep, spec = item.partition("=")
    if not sep or not match or not spec:
        raise ConfigError([f"refresh_patterns: {item!r} is not PATTERN=SPEC"])
    if spec == "immutable":
        return {"match": match, "immutable": True}
    rule: dict[str, Any] = {"match": match}
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if key not in ("max_age", "min_age") or not eq:
            raise ConfigError(
                [f"refresh_patterns: {part!r} in {item!r} is not max_age=... or min_age=..."]
            )
        rule[key] = value
    return rule


def _drive_overrides(args: argparse.Namespace, raw_drives: list[dict[str, Any]]) -> Any:
    if args.cache_dir:
        raw_drives = [{"path": str(d)} for d in args.cache_dir]
    if args.max_size is not None or args.min_free is not None:
        raw_drives = [dict(d) for d in raw_drives]
        for d in raw_drives:
            if args.max_size is not None:
                d["max_size"] = args.max_size
            if args.min_free is not None:
                d["min_free"] = args.min_free
    return raw_drives


def effective_config(args: argparse.Namespace) -> Config:
    """Defaults, then ``--config``, then flags.

    Raises:
      ConfigError: one line per problem.
    """
    overrides = _overrides(args)
    if args.cache_dir or args.max_size is not None or args.min_free is not None:
        file_drives: list[dict[str, Any]] = [{"path": "mcc-cache"}]
        if args.config is not None:
            import tomllib

            try:
                with open(args.config, "rb") as f:
                    file_drives = tomllib.load(f).get("drives", file_drives)
            except (OSError, tomllib.TOMLDecodeError):
                pass  # load_config below reports the unreadable file
        overrides["drives"] = _drive_overrides(args, file_drives)
    return load_config(args.config, overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = effective_config(args)
    from .http.run import run_server

    # SIGHUP reads the config again the same way: the same file, the same flags on top
    return run_server(config, lambda: effective_config(args))


def _cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_toml(effective_config(args)))
    return 0


# Without a terminal, progress is one plain line this often (a log stays readable).
_PLAIN_PROGRESS_SECONDS = 2.0


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar in bytes, with rate and time left, on standard error; when that
    is not a terminal, a plain line every few seconds instead. Yields
    ``update(bytes_done, bytes_total)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total or None)
        return
    started = time.monotonic()
    shown = -math.inf

    def plain(done: int, total: int) -> None:
        nonlocal shown
        now = time.monotonic()
        if now - shown < _PLAIN_PROGRESS_SECONDS and done < total:
            return
        shown = now
        sys.stderr.write(_progress_line(label, done, total, now - started) + "\n")
        sys.stderr.flush()

    yield plain


def _progress_line(label: str, done: int, total: int, seconds: float) -> str:
    pct = f" ({100 * done // total} %)" if total else ""
    line = f"{label}: {human_size(done)} of {human_size(total)}{pct}"
    if seconds > 0 and done:
        rate = done / seconds
        line += f", {human_size(rate)}/s"
        if done < total:
            line += f", about {math.ceil((total - done) / rate)} s left"
    return line


def _print_table(rows: Sequence[tuple[str, str]]) -> None:
    """Two columns on standard output (no borders, no wrapping of long values)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True, overflow="ignore")
    for k, v in rows:
        table.add_row(Text(k), Text(v))  # Text: "[::1]:8080" is not markup
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table needs
        console = Console(width=max(map(len, dict(rows))) + max(len(v) for _, v in rows) + 4)
    console.print(table)


def _cmd_verify(args: argparse.Namespace) -> int:
    from .engine.engine import drive_infos
    from .store.lock import CacheLocked
    from .store.verify import verify_cache

    config = effective_config(args)
    if args.live:
        from .ops.client import AdminClient

        if args.repair:
            sys.stderr.write("mcc: --repair needs the node stopped; --live only checks\n")
            return EXIT_USAGE
        result = AdminClient(config).call("POST", "/verify", {}, timeout=_LIVE_VERIFY_TIMEOUT)
        _print_table([(str(k), str(v)) for k, v in result["rows"]])
        return 0 if result["clean"] else 1
    index_path = Path(config.drives[0].path) / "index.sqlite3"
    if not index_path.exists():
        sys.stderr.write(f"mcc: no cache index at {index_path}\n")
        return 1
    try:
        with contextlib.ExitStack() as stack:
            progress = None if args.quiet else stack.enter_context(_progress("verifying"))
            report = verify_cache(
                drive_infos(config.drives), index_path, repair=args.repair, progress=progress
            )
    except CacheLocked as exc:
        sys.stderr.write(
            f"mcc: {exc}: stop that node first, or check it through its admin API "
            "with 'mcc verify --live'\n"
        )
        return 1
    _print_table(report.rows())
    if report.clean or args.repair:
        return 0
    sys.stdout.write("problems found: run again with --repair to fix them\n")
    return 1


# A live verify hashes the whole cache before it answers.
_LIVE_VERIFY_TIMEOUT = 3600.0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _cmd_stats(args: argparse.Namespace) -> int:
    from .ops.client import AdminClient

    client = AdminClient(effective_config(args))
    if args.peers:
        return _print_cluster(client.call("GET", "/summary?cluster=1"))
    s = client.call("GET", "/summary")
    health = client.call("GET", "/health")
    rows = [
        ("node", str(s["nodeId"])),
        ("ready", "yes" if health.get("ready") else "NO"),
        ("uptime", f"{s['uptimeSeconds']:.0f} s"),
        ("hit ratio, bytes (15 s)", _pct(s["last15s"]["hitRatioBytes"])),
        ("hit ratio, bytes (since start)", _pct(s["sinceStart"]["hitRatioBytes"])),
        ("hit ratio, requests (since start)", _pct(s["sinceStart"]["hitRatioRequests"])),
        ("served", human_size(s["egressBytes"])),
        ("from upstream", human_size(s["upstreamBytes"])),
        ("open connections", str(s["openConnections"])),
        ("joined fetches", str(s["flightJoins"])),
    ]
    rows += [
        (f"drive {d['path']}", f"{human_size(d['bytes'])} of {human_size(d['capacity'])}")
        for d in s["drives"]
    ]
    rows += [(f"parent {p}", "up" if up else "DOWN") for p, up in s["parents"].items()]
    if not s["parents"]:
        rows.append(("parents", "none configured (misses go to the origin)"))
    _print_table(rows)
    return 0


def _print_cluster(c: dict[str, Any]) -> int:
    """The table of ``mcc stats --peers``: one row per node, then the cluster's sums."""
    rows = [("node", "served to clients", "from upstream", "to/from peers", "hit ratio")]
    for n in c["nodes"]:
        name = str(n["nodeId"] or n["url"])
        if "error" in n:
            rows.append((name, f"UNREACHABLE: {n['error']}", "", "", ""))
            continue
        peers = f"{human_size(n['peerServedBytes'])} / {human_size(n['peerReceivedBytes'])}"
        rows.append(
            (
                name,
                human_size(n["clientBytes"]),
                human_size(n["originBytes"]),
                peers,
                _pct(n["hitRatioBytes"]),
            )
        )
    rows.append(
        (
            f"cluster ({c['answered']} of {c['answered'] + c['unreachable']} nodes)",
            human_size(c["clientBytes"]),
            human_size(c["originBytes"]),
            human_size(c["peerBytes"]),
            _pct(c["hitRatioBytes"]),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )
    return 0 if not c["unreachable"] else 1


def _cmd_warm(args: argparse.Namespace) -> int:
    from .ops.client import AdminClient

    client = AdminClient(effective_config(args))
    job = client.call("POST", "/warm", {"urls": args.urls})
    with _progress("warming") as update:
        while job["state"] != "done":
            update(job["bytes"], job["totalBytes"])
            time.sleep(0.2)
            job = client.call("GET", f"/warm/{job['id']}")
        update(job["bytes"], job["totalBytes"])
    sys.stdout.write(
        f"warmed {job['done']} of {job['total']} objects ({human_size(job['bytes'])}), "
        f"{job['failed']} failed\n"
    )
    for line in job["errors"]:
        sys.stderr.write(f"mcc: {line}\n")
    return 0 if not job["failed"] else 1


def _cmd_purge(args: argparse.Namespace) -> int:
    from .ops.client import AdminClient
    from .ops.purge import PurgeTarget

    target = args.target
    try:
        PurgeTarget.parse(target)  # a typo is told here, before the node is asked
    except ValueError as exc:
        sys.stderr.write(f"mcc: purge: {exc}\n")
        return EXIT_USAGE
    client = AdminClient(effective_config(args))
    body = {"prefix": target} if "://" in target else {"pattern": target}
    result = client.call("POST", "/purge", body)
    for key in result["purged"]:
        sys.stdout.write(f"purged {key}\n")
    if not result["purged"]:
        sys.stderr.write(f"mcc: nothing stored matches {target}\n")
        return 1
    sys.stdout.write(f"{len(result['purged'])} objects purged\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``mcc`` argument parser, subcommands included."""
    parser = _Parser(
        prog="mcc",
        description="mcc: a caching HTTP server for large downloads (OS updates, "
        "app packages, package repositories).",
    )
    parser.add_argument("--version", action="version", version=f"mcc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser(
        "serve",
        help="run the cache server",
        description="Run the cache server until SIGTERM/SIGINT (drain and exit 0). "
        "SIGHUP reopens the log files and rereads --config with the same flags on "
        "top. With no --config, runs on the embedded defaults: 127.0.0.1:8080, "
        "cache in ./mcc-cache. Exit status 1 when another mcc uses the cache "
        "directory.",
    )
    _add_config_flags(serve)
    serve.set_defaults(func=_cmd_serve)
    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(
        dest="config_command", metavar="ACTION", parser_class=_Parser
    )
    show = config_sub.add_parser(
        "show",
        help="print the effective config as TOML",
        description="Print the effective config (defaults, file, flags) as TOML.",
    )
    _add_config_flags(show)
    show.set_defaults(func=_cmd_config_show)
    verify = sub.add_parser(
        "verify",
        help="check every stored blob against its digest and the index",
        description="Walk the whole cache: report corrupt, missing and orphan blobs "
        "and leftover temp files; with --repair, fix them. Needs the node stopped "
        "(a running node locks its cache); --live asks a running node to check its "
        "own cache instead. Exit status 1 when problems were found and not repaired.",
    )
    _add_config_flags(verify)
    verify.add_argument("--repair", action="store_true", help="fix what is found")
    verify.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    verify.add_argument(
        "--live",
        action="store_true",
        help="check through a running node's admin API (no --repair; blobs being "
        "written or evicted meanwhile may show as orphans or missing)",
    )
    verify.set_defaults(func=_cmd_verify)
    stats = sub.add_parser(
        "stats",
        help="print a running node's statistics",
        description="Ask a running node's admin API (admin_listen, admin_token) for its "
        "summary and health and print them as a table.",
    )
    _add_config_flags(stats)
    stats.add_argument(
        "--peers",
        action="store_true",
        help="the whole cluster: every peer's statistics and their sums (exit 1 if a "
        "peer could not be asked)",
    )
    stats.set_defaults(func=_cmd_stats)
    warm = sub.add_parser(
        "warm",
        help="pre-seed a running node with URLs",
        description="Ask a running node to fetch every block of these URLs, showing "
        "progress in bytes (rate, time left) until it is done; without a terminal, "
        "a plain line every 2 s. Exit status 1 when any URL failed.",
    )
    _add_config_flags(warm)
    warm.add_argument("urls", nargs="+", metavar="URL", help="absolute http:// URLs")
    warm.set_defaults(func=_cmd_warm)
    purge = sub.add_parser(
        "purge",
        help="remove objects from a running node",
        description="Remove objects from a running node's cache: every object whose "
        "URL starts with an http:// URL prefix, or whose host matches a pattern in "
        "the allowlist's syntax (host, host:port or *.suffix; without a port, any "
        "port). Prints what was purged; exit status 1 when nothing matched, 2 for a "
        "target that is neither.",
    )
    _add_config_flags(purge)
    purge.add_argument(
        "target",
        metavar="URL-PREFIX|PATTERN",
        help="an http:// URL prefix, or host, host:port or *.suffix",
    )
    purge.set_defaults(func=_cmd_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mcc`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = func(args)
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(f"mcc: {line}\n")
        return EXIT_USAGE
    except McError as exc:
        sys.stderr.write(f"mcc: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
