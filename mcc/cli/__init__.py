"""The ``mcc`` command line: ``serve``, ``config show``, ``verify``, ``stats``, ``warm``
and ``purge``.

Every config key has a flag, made from its knob (:mod:`mcc.cli.flags`); flags win over
the file. Problems with the config or flags print one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..errors import ConfigError, McError
from . import commands
from .commands import EXIT_USAGE
from .flags import add_config_flags, effective_config

__all__ = ["build_parser", "effective_config", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, no usage dump
        sys.stderr.write(f"mcc: {message}\n")
        raise SystemExit(EXIT_USAGE)


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
    add_config_flags(serve)
    serve.set_defaults(func=commands.cmd_serve)
    config = sub.add_parser("config", help="inspect the configuration")
    config_sub = config.add_subparsers(
        dest="config_command", metavar="ACTION", parser_class=_Parser
    )
    show = config_sub.add_parser(
        "show",
        help="print the effective config as TOML",
        description="Print the effective config (defaults, file, flags) as TOML.",
    )
    add_config_flags(show)
    show.set_defaults(func=commands.cmd_config_show)
    verify = sub.add_parser(
        "verify",
        help="check every stored blob against its digest and the index",
        description="Walk the whole cache: report corrupt, missing and orphan blobs "
        "and leftover temp files; with --repair, fix them. Needs the node stopped "
        "(a running node locks its cache); --live asks a running node to check its "
        "own cache instead. Exit status 1 when problems were found and not repaired.",
    )
    add_config_flags(verify)
    verify.add_argument("--repair", action="store_true", help="fix what is found")
    verify.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    verify.add_argument(
        "--live",
        action="store_true",
        help="check through a running node's admin API (no --repair; blobs being "
        "written or evicted meanwhile may show as orphans or missing)",
    )
    verify.set_defaults(func=commands.cmd_verify)
    stats = sub.add_parser(
        "stats",
        help="print a running node's statistics",
        description="Ask a running node's admin API (admin_listen, admin_token) for its "
        "summary and health and print them as a table.",
    )
    add_config_flags(stats)
    stats.add_argument(
        "--peers",
        action="store_true",
        help="the whole cluster: every peer's statistics and their sums (exit 1 if a "
        "peer could not be asked)",
    )
    stats.set_defaults(func=commands.cmd_stats)
    warm = sub.add_parser(
        "warm",
        help="pre-seed a running node with URLs",
        description="Ask a running node to fetch every block of these URLs, showing "
        "progress in bytes (rate, time left) until it is done; without a terminal, "
        "a plain line every 2 s. Exit status 1 when any URL failed.",
    )
    add_config_flags(warm)
    warm.add_argument("urls", nargs="+", metavar="URL", help="absolute http:// URLs")
    warm.set_defaults(func=commands.cmd_warm)
    purge = sub.add_parser(
        "purge",
        help="remove objects from a running node",
        description="Remove objects from a running node's cache: every object whose "
        "URL starts with an http:// URL prefix, or whose host matches a pattern in "
        "the allowlist's syntax (host, host:port or *.suffix; without a port, any "
        "port). Prints what was purged; exit status 1 when nothing matched, 2 for a "
        "target that is neither.",
    )
    add_config_flags(purge)
    purge.add_argument(
        "target",
        metavar="URL-PREFIX|PATTERN",
        help="an http:// URL prefix, or host, host:port or *.suffix",
    )
    purge.set_defaults(func=commands.cmd_purge)
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
