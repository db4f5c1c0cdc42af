"""The buffered access log (mcc/ops/accesslog.py): lines leave in batches, none is
lost or doubled, and a running server writes them within the flush interval."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fixtures.origin import Origin
from mcc.config import load_config
from mcc.ops.accesslog import (
    FLUSH_BYTES,
    AccessRecord,
    configure_logging,
    flush_access,
    write_access,
)
from tests.helpers import Client, run_node


@pytest.fixture
def access_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "access.log"
    configure_logging(load_config(overrides={"access_log": str(path), "log_level": "warning"}))
    try:
        yield path
    finally:
        configure_logging(load_config(overrides={"access_log": ""}))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_lines_wait_in_the_buffer_until_flushed(access_file: Path) -> None:
    for i in range(5):
        write_access(AccessRecord(client="127.0.0.1:1", method="GET", url=f"/a{i}", status=200))
    assert _lines(access_file) == []  # buffered: no write per request
    flush_access()
    lines = _lines(access_file)
    assert [line.split(" url=")[1].split()[0] for line in lines] == [f"/a{i}" for i in range(5)]
    flush_access()  # nothing waits: nothing doubled
    assert len(_lines(access_file)) == 5


def test_a_full_buffer_is_written_without_waiting(access_file: Path) -> None:
    url = "/" + "u" * 1000
    n = FLUSH_BYTES // 1000 + 2
    for _ in range(n):
        write_access(AccessRecord(client="127.0.0.1:1", method="GET", url=url, status=200))
    written = len(_lines(access_file))
    assert 0 < written < n  # one batch went out by size, the rest waits
    flush_access()
    assert len(_lines(access_file)) == n


def test_reconfiguring_writes_what_was_buffered_to_the_old_file(
    access_file: Path, tmp_path: Path
) -> None:
    write_access(AccessRecord(client="127.0.0.1:1", method="GET", url="/old", status=200))
    rotated = tmp_path / "access.log.1"
    access_file.rename(rotated)  # as logrotate does, then SIGHUP
    configure_logging(load_config(overrides={"access_log": str(access_file)}))
    write_access(AccessRecord(client="127.0.0.1:1", method="GET", url="/new", status=200))
    flush_access()
    assert ["/old" in line for line in _lines(rotated)] == [True]
    assert ["/new" in line for line in _lines(access_file)] == [True]


async def test_a_running_server_writes_each_line_once_soon_after(
    access_file: Path, origin: Origin, tmp_path: Path
) -> None:
    origin.put("/f.bin", b"f" * 5000)
    async with run_node(tmp_path / "c", allow_origins=[origin.authority]) as node:
        async with Client.connect(node.port) as c:
            for _ in range(7):
                assert (await c.request(origin.url("/f.bin"))).status == 200
        # written by the flusher task within its interval, not at shutdown
        for _ in range(200):
            if len(_lines(access_file)) >= 7:
                break
            await trio.sleep(0.05)
        assert len(_lines(access_file)) == 7
    lines = _lines(access_file)
    assert len(lines) == 7 and all("/f.bin" in line and "status=200" in line for line in lines)
