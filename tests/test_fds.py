"""The blob fd cache (mcc/store/fds.py): an fd is closed only when nobody uses it.

A model-based hypothesis test: readers acquire and release fds of a few blobs while
blobs are retired (deleted, quarantined) and the cache trims; at every step each
fd a reader holds is still open on its own blob's file, and once every reader has
handed its fds back no retired fd is left open."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from mcc.store.fds import FdCache

DIGESTS = ["a", "b", "c", "d"]

steps = st.lists(
    st.tuples(st.sampled_from(["acquire", "release", "retire", "reopen"]), st.integers(0, 3)),
    max_size=60,
)


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


@settings(max_examples=150, deadline=None)
@given(steps=steps, limit=st.integers(1, 3))
def test_no_fd_is_closed_under_a_reader(steps: list[tuple[str, int]], limit: int) -> None:
    root = Path(tempfile.mkdtemp())
    files = {d: root / d for d in DIGESTS}
    for path in files.values():
        path.write_bytes(b"x")
    inodes = {d: path.stat().st_ino for d, path in files.items()}
    opened: list[int] = []

    def opener(digest: str) -> int:
        fd = os.open(files[digest], os.O_RDONLY)
        opened.append(fd)
        return fd

    cache = FdCache(limit)
    held: list[tuple[str, int, int]] = []  # (digest, fd, inode it was opened on)
    for op, i in steps:
        digest = DIGESTS[i]
        if op == "acquire":
            fd = cache.acquire(digest, opener)
            held.append((digest, fd, inodes[digest]))
        elif op == "release" and held:
            digest, fd, _ = held.pop(i % len(held))
            cache.release(digest, fd)
        elif op == "retire":
            cache.retire(digest)
        elif op == "reopen":  # another file takes whatever fd number is free now
            extra = os.open(files[DIGESTS[(i + 1) % 4]], os.O_RDONLY)
            os.close(extra)
        for _, fd, inode in held:  # every fd a reader holds is open on its blob
            assert _inode(fd) == inode
    for digest, fd, _ in held:
        cache.release(digest, fd)
    assert not cache._retired  # every retired fd closed by its last user
    cache.close()
    for path in files.values():
        path.unlink()
    root.rmdir()
