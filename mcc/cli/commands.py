"""The subcommands: ``serve`` and ``config show`` run here; ``verify`` works on a stopped
node's cache; ``stats``, ``warm`` and ``purge`` ask a running node's admin API."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from ..config import Config, config_to_toml
from ..units import human_size
from .flags import effective_config
from .output import pct, print_table, progress

__all__ = [
    "EXIT_USAGE",
    "cmd_config_show",
    "cmd_purge",
    "cmd_serve",
    "cmd_stats",
    "cmd_verify",
    "cmd_warm",
]

EXIT_USAGE = 2


def cmd_serve(args: argparse.Namespace) -> int:
    config = effective_config(args)
    from ..http.run import run_server
    from ..http.workers import run_workers

    # SIGHUP reads the config again the same way: the same file, the same flags on top
    run = run_workers if config.workers > 1 else run_server
    return run(config, lambda: effective_config(args))


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_toml(effective_config(args)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..engine.opening import drive_infos
    from ..store.lock import CacheLocked
    from ..store.verify import verify_cache

    config = effective_config(args)
    if args.live:
        return _verify_live(config, args.repair)
    index_path = Path(config.drives[0].path) / "index.sqlite3"
    if not index_path.exists():
        sys.stderr.write(f"mcc: no cache index at {index_path}\n")
        return 1
    try:
        with contextlib.ExitStack() as stack:
            update = None if args.quiet else stack.enter_context(progress("verifying"))
            report = verify_cache(
                drive_infos(config.drives), index_path, repair=args.repair, progress=update
            )
    except CacheLocked as exc:
        if args.repair:  # a running node repairs its own cache (it stops serving at once)
            sys.stderr.write(f"mcc: {exc}: repairing through its admin API\n")
            return _verify_live(config, True)
        sys.stderr.write(
            f"mcc: {exc}: stop that node first, or check it through its admin API "
            "with 'mcc verify --live'\n"
        )
        return 1
    print_table(report.rows())
    if report.clean or args.repair:
        return 0
    sys.stdout.write("problems found: run again with --repair to fix them\n")
    return 1


def _verify_live(config: Config, repair: bool) -> int:
    """``mcc verify --live [--repair]``: the running node checks (and repairs) itself."""
    from ..ops.client import AdminClient

    doc = {"repair": True} if repair else {}
    result = AdminClient(config).call("POST", "/verify", doc, timeout=_LIVE_VERIFY_TIMEOUT)
    print_table([(str(k), str(v)) for k, v in result["rows"]])
    return 0 if result["clean"] or repair else 1


# A live verify hashes the whole cache before it answers.
_LIVE_VERIFY_TIMEOUT = 3600.0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..ops.client import AdminClient

    client = AdminClient(effective_config(args))
    if args.peers:
        return _print_cluster(client.call("GET", "/summary?cluster=1"))
    s = client.call("GET", "/summary")
    health = client.call("GET", "/health")
    rows = [
        ("node", str(s["nodeId"])),
        ("ready", "yes" if health.get("ready") else "NO"),
        ("uptime", f"{s['uptimeSeconds']:.0f} s"),
        ("hit ratio, bytes (15 s)", pct(s["last15s"]["hitRatioBytes"])),
        ("hit ratio, bytes (since start)", pct(s["sinceStart"]["hitRatioBytes"])),
        ("hit ratio, requests (since start)", pct(s["sinceStart"]["hitRatioRequests"])),
        ("served", human_size(s["egressBytes"])),
        ("from upstream", human_size(s["upstreamBytes"])),
        ("open connections", str(s["openConnections"])),
        ("joined fetches", str(s["flightJoins"])),
    ]
    lag = s.get("loopLag")
    if lag:
        rows.append(
            ("loop lag (10 s p99 / max)", f"{lag['recentP99Ms']:.1f} / {lag['recentMaxMs']:.1f} ms")
        )
    rows += [
        (f"drive {d['path']}", f"{human_size(d['bytes'])} of {human_size(d['capacity'])}")
        for d in s["drives"]
    ]
    rows += [(f"parent {p}", "up" if up else "DOWN") for p, up in s["parents"].items()]
    if not s["parents"]:
        rows.append(("parents", "none configured (misses go to the origin)"))
    print_table(rows)
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
                pct(n["hitRatioBytes"]),
            )
        )
    rows.append(
        (
            f"cluster ({c['answered']} of {c['answered'] + c['unreachable']} nodes)",
            human_size(c["clientBytes"]),
            human_size(c["originBytes"]),
            human_size(c["peerBytes"]),
            pct(c["hitRatioBytes"]),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n"
        )
    return 0 if not c["unreachable"] else 1


def cmd_warm(args: argparse.Namespace) -> int:
    from ..ops.client import AdminClient

    client = AdminClient(effective_config(args))
    job = client.call("POST", "/warm", {"urls": args.urls})
    with progress("warming") as update:
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


def cmd_purge(args: argparse.Namespace) -> int:
    from ..ops.client import AdminClient
    from ..ops.purge import PurgeTarget

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
