"""Freshness, revalidation and stale-if-error (RFC 9111), through a node."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from fixtures.origin import Fault, Origin
from mcc.engine.blocks import ObjectMeta
from mcc.policy import RefreshRule, freshness_lifetime, is_fresh, may_serve_stale
from tests.helpers import Node, get, run_node

NOW = 1_800_000_000.0


def _meta(
    *headers: tuple[str, str], lm: float | None = None, key: str = "http://h/x"
) -> ObjectMeta:
    last = email.utils.formatdate(lm, usegmt=True) if lm is not None else None
    return ObjectMeta(key, "v", 1, last_modified=last, headers=tuple(headers), fetched_at=NOW)


def test_lifetime_precedence() -> None:
    assert freshness_lifetime(_meta(("cache-control", "max-age=60, s-maxage=10"))) == 10
    assert freshness_lifetime(_meta(("cache-control", "max-age=60"))) == 60
    assert freshness_lifetime(_meta(("cache-control", "no-cache, max-age=60"))) == 0
    expires = email.utils.formatdate(NOW + 120, usegmt=True)
    date = email.utils.formatdate(NOW, usegmt=True)
    assert freshness_lifetime(_meta(("expires", expires), ("date", date))) == 120
    assert freshness_lifetime(_meta(("expires", "0"))) == 0  # invalid Expires: stale
    # heuristic: 10 % of the time since Last-Modified, capped
    assert freshness_lifetime(_meta(lm=NOW - 1000)) == pytest.approx(100)
    assert freshness_lifetime(_meta(lm=NOW - 10**7), heuristic_max=3600) == 3600
    assert freshness_lifetime(_meta()) == 0


def test_refresh_rules_override() -> None:
    rules = (RefreshRule("*.deb", immutable=True), RefreshRule("*/InRelease", max_age=300))
    deb = _meta(key="http://deb.example/pool/a.deb")
    assert not is_fresh(deb, NOW + 10, (RefreshRule("*.deb", max_age=5),))  # beats the default
    assert is_fresh(deb, NOW + 10**9, rules)
    rel = _meta(("cache-control", "max-age=86400"), key="http://deb.example/dists/x/InRelease")
    assert freshness_lifetime(rel, rules) == 300


def test_stale_if_error_limits() -> None:
    m = _meta(("cache-control", "max-age=10"))
    assert may_serve_stale(m, NOW + 100, max_stale=3600)
    assert not may_serve_stale(m, NOW + 10_000, max_stale=3600)
    assert not may_serve_stale(
        _meta(("cache-control", "max-age=10, must-revalidate")), NOW + 100, 3600
    )
    assert not may_serve_stale(_meta(("cache-control", "s-maxage=10")), NOW + 100, 3600)


@pytest.fixture
async def node(origin: Origin, tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(
        tmp_path / "c",
        allow_origins=[origin.authority],
        refresh_patterns=[
            {"match": "*/InRelease", "max_age": "200ms"},
            {"match": "*.deb", "immutable": True},
        ],
        limits={"upstream_retries": 0},
        timeouts={"read": 0.3},
    ) as n:
        yield n


async def test_apt_index_is_revalidated_and_served_fresh(node: Node, origin: Origin) -> None:
    url = origin.url("/debian/dists/stable/InRelease")
    origin.put(
        "/debian/dists/stable/InRelease",
        b"index v1\n" * 100,
        headers=(("cache-control", "max-age=3600"),),
    )
    r = await get(node.port, url)
    assert r.body == b"index v1\n" * 100
    await node.cache.wait_idle()
    r = await get(node.port, url)
    assert r.header("cache-status") == "node; hit"  # fresh for 200 ms
    await trio.sleep(0.3)
    r = await get(node.port, url)  # stale: revalidated, unchanged -> 304 upstream
    assert r.body == b"index v1\n" * 100
    assert r.header("cache-status") == "node; fwd=stale; fwd-status=304"
    assert (
        origin.requests[-1].headers.get("if-none-match")
        == origin.objects["/debian/dists/stable/InRelease"].etag
    )
    origin.put(
        "/debian/dists/stable/InRelease",
        b"index v2 is longer\n" * 100,
        headers=(("cache-control", "max-age=3600"),),
    )
    await trio.sleep(0.3)
    r = await get(node.port, url)
    assert r.body == b"index v2 is longer\n" * 100  # the changed index, fresh
    await node.cache.wait_idle()
    r = await get(node.port, url)
    assert r.body == b"index v2 is longer\n" * 100 and r.header("cache-status") == "node; hit"


async def test_immutable_packages_are_never_revalidated(node: Node, origin: Origin) -> None:
    origin.put(
        "/pool/a.deb", b"deb" * 1000, last_modified=email.utils.formatdate(time.time(), usegmt=True)
    )  # heuristic lifetime ~0
    await get(node.port, origin.url("/pool/a.deb"))
    await node.cache.wait_idle()
    n = len(origin.requests)
    await trio.sleep(0.1)
    r = await get(node.port, origin.url("/pool/a.deb"))
    assert r.header("cache-status") == "node; hit" and len(origin.requests) == n


async def test_stale_if_error_serves_the_stored_copy(node: Node, origin: Origin) -> None:
    origin.put("/x.bin", b"payload" * 100, headers=(("cache-control", "max-age=0"),))
    await get(node.port, origin.url("/x.bin"))
    await node.cache.wait_idle()
    for fault in (Fault(status=503), Fault(drop=True), Fault(head_delay=5)):
        origin.faults["/x.bin"] = fault
        r = await get(node.port, origin.url("/x.bin"))
        assert r.status == 200 and r.body == b"payload" * 100, fault
        assert r.header("cache-status") == "node; hit; detail=stale-if-error"
    assert node.cache.statistics().stale_served == 3


async def test_must_revalidate_is_not_served_stale(node: Node, origin: Origin) -> None:
    origin.put("/m.bin", b"m" * 100, headers=(("cache-control", "max-age=0, must-revalidate"),))
    await get(node.port, origin.url("/m.bin"))
    await node.cache.wait_idle()
    origin.faults["/m.bin"] = Fault(drop=True)
    r = await get(node.port, origin.url("/m.bin"))
    assert r.status == 502
