"""Fixtures shared by the tests: a real test origin on loopback and a cache over it."""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
import trio
from _pytest.outcomes import Skipped

import mcc
from fixtures.origin import Origin


@pytest.fixture
async def origin(nursery: trio.Nursery) -> Origin:
    o = Origin()
    await nursery.start(o.serve)
    return o


@pytest.fixture
async def cache(origin: Origin, tmp_path: Path) -> AsyncIterator[mcc.Cache]:
    async with mcc.open_cache(
        cache_dir=tmp_path / "cache",
        allow_origins=[origin.authority],
        block_size="64KiB",
        node_id="test",
    ) as c:
        yield c


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep the reason of a skip raised inside an async test.

    pytest-trio catches the ``Skipped`` a test raises (trio hands it over wrapped in
    an exception group) and raises a new, empty one in its place, so ``pytest -ra``
    printed ``Skipped`` with no reason. The original is the new one's context.
    """
    report = yield
    if report.skipped and call.excinfo is not None and not str(call.excinfo.value):
        original = _inner_skip(call.excinfo.value.__context__)
        if original is not None:
            where = _skip_location(original)
            report.longrepr = (where[0], where[1], f"Skipped: {original.msg}")
    return report


def _inner_skip(exc: BaseException | None) -> Skipped | None:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, Skipped) else None


def _skip_location(exc: BaseException) -> tuple[str, int]:
    """The test's own line that skipped (pytest's and pytest-trio's frames left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/_pytest/" not in f.filename and "pytest_trio" not in f.filename]
    frame = (ours or frames)[-1]
    return frame.filename, frame.lineno or 0
