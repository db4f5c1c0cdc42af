"""One outcome per request: Cache-Status, the access log's ``cache=`` field and the
request counters agree, one request per outcome (table-driven)."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio

from fixtures.origin import Fault, Origin
from mcc.ops.outcome import SERVED, Outcome, cache_status, served_outcome
from tests.helpers import Node, Response, get, run_node

DATA = os.urandom(200_000)  # four 64 KiB blocks


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _access_lines() -> Iterator[list[str]]:
    logger = logging.getLogger("mcc.access")
    saved = (logger.disabled, logger.level, logger.propagate)
    handler = _Lines()
    logger.disabled, logger.propagate = False, False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.disabled, logger.level, logger.propagate = saved


def _field(line: str, name: str) -> str:
    for part in line.split():
        key, _, value = part.partition("=")
        if key == name:
            return value
    raise AssertionError(f"no {name}= in {line!r}")


async def _hit(node: Node, origin: Origin) -> Response:
    origin.put("/hit", DATA, headers=(("cache-control", "max-age=3600"),))
    await get(node.port, origin.url("/hit"))
    await node.cache.wait_idle()
    return await get(node.port, origin.url("/hit"))


async def _miss(node: Node, origin: Origin) -> Response:
    return await get(node.port, origin.url("/miss"))


async def _partial(node: Node, origin: Origin) -> Response:
    origin.put("/partial", DATA, headers=(("cache-control", "max-age=3600"),))
    await get(node.port, origin.url("/partial"), [("range", "bytes=0-99")])
    await node.cache.wait_idle()
    return await get(node.port, origin.url("/partial"))


async def _revalidated(node: Node, origin: Origin) -> Response:
    origin.put("/reval", DATA, headers=(("cache-control", "max-age=0"),))
    await get(node.port, origin.url("/reval"))
    await node.cache.wait_idle()
    return await get(node.port, origin.url("/reval"))


async def _stale(node: Node, origin: Origin) -> Response:
    origin.put("/stale", DATA, headers=(("cache-control", "max-age=0"),))
    await get(node.port, origin.url("/stale"))
    await node.cache.wait_idle()
    origin.faults["/stale"] = Fault(status=503)
    return await get(node.port, origin.url("/stale"))


async def _pass(node: Node, origin: Origin) -> Response:
    return await get(node.port, origin.url("/post"), method="POST", body=b"hello")


async def _error(node: Node, origin: Origin) -> Response:
    return await get(node.port, "http://not-allowed.example/x")


async def _aborted(node: Node, origin: Origin) -> Response:
    """A client that reads the head of a slow miss, then hangs up."""
    origin.chunk_size = 4096
    origin.faults["/slow"] = Fault(body_delay=0.01)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    request = f"GET {origin.url('/slow')} HTTP/1.1\r\nhost: mcc.test\r\n\r\n"
    await stream.send_all(request.encode())
    head = b""
    for _ in range(100):  # bounded: until the head arrived
        head += await stream.receive_some(65536)
        if b"\r\n\r\n" in head:
            break
    await stream.aclose()
    return Response(0, (), head)


@attrs.frozen
class Case:
    outcome: Outcome
    run: Callable[[Node, Origin], Awaitable[Response]]
    status: int
    cache_status: str | None  # None: not checked (a response cut short)


CASES = [
    Case(Outcome.HIT, _hit, 200, "node; hit"),
    Case(Outcome.MISS, _miss, 200, "node; fwd=miss; stored"),
    Case(Outcome.PARTIAL, _partial, 200, "node; fwd=partial; stored"),
    Case(Outcome.REVALIDATED, _revalidated, 200, "node; fwd=stale; fwd-status=304"),
    Case(Outcome.STALE, _stale, 200, "node; hit; detail=stale-if-error"),
    Case(Outcome.PASS, _pass, 200, "node; fwd=uri-miss"),
    Case(Outcome.ERROR, _error, 403, ""),
    Case(Outcome.ABORTED, _aborted, 0, None),
]


def test_every_outcome_has_a_case() -> None:
    assert {c.outcome for c in CASES} == set(Outcome)


@pytest.mark.parametrize("case", CASES, ids=[c.outcome.value for c in CASES])
async def test_cache_status_log_and_counters_agree(
    case: Case, origin: Origin, tmp_path: Path
) -> None:
    origin.put("/miss", DATA)
    origin.put("/slow", DATA)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        with _access_lines() as lines:
            before = dict(node.server.metrics.requests.by_outcome())
            seen = len(lines)
            r = await case.run(node, origin)
            for _ in range(500):  # bounded: an aborted response is logged when it breaks
                if len(lines) > seen and _field(lines[-1], "cache") == case.outcome.value:
                    break
                await trio.sleep(0.01)
            after = dict(node.server.metrics.requests.by_outcome())
        line = lines[-1]
        # the log line carries the fields tools parse, and the outcome
        for name in ("client", "method", "url", "range", "status", "bytes", "duration_ms"):
            _field(line, name)
        assert _field(line, "cache") == case.outcome.value, line
        # the counter of that outcome moved by one for the last request
        assert after[case.outcome] - before[case.outcome] >= 1
        assert sum(after.values()) - sum(before.values()) == len(lines) - seen
        if case.status:
            assert r.status == case.status and _field(line, "status") == str(case.status)
        if case.cache_status is not None:  # the field says what the log says
            assert (r.header("cache-status") or "") == case.cache_status, r.headers
            fwd = 304 if case.outcome is Outcome.REVALIDATED else r.status
            assert (cache_status("node", _field(line, "cache"), fwd) or "") == case.cache_status


def test_served_outcomes_table() -> None:
    """A record learned upstream just now is never a hit; a stale one revalidated or
    served on error says so whatever its blocks."""
    assert served_outcome("fresh", "hit") is Outcome.HIT
    for lookup in ("miss", "changed"):
        assert served_outcome(lookup, "hit") is Outcome.MISS
    for coverage in ("hit", "partial", "miss"):
        assert served_outcome("revalidated", coverage) is Outcome.REVALIDATED
        assert served_outcome("stale", coverage) is Outcome.STALE
    assert set(SERVED.values()) <= set(Outcome)


@pytest.mark.parametrize(
    ("word", "status", "expected"),
    [
        ("revalidated", 304, "n; fwd=stale; fwd-status=304"),
        ("revalidated", 206, "n; fwd=stale; fwd-status=206"),  # a same-version 206
        ("error", 502, None),
        ("purge", 0, None),
    ],
)
def test_cache_status_values(word: str, status: int, expected: str | None) -> None:
    assert cache_status("n", word, status) == expected
