"""Cross-process fill claims (mcc/store/claims.py): one filler per block among many
processes, followers reading the same file as it grows, and a kill -9 of the filler
taken over without a wrong byte (issue 17 item 1, the store primitive)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcc.store.blobs import BlobStore, DriveInfo, digest_of
from mcc.store.claims import (
    DONE_MODE,
    ClaimedWriter,
    Follow,
    Role,
    claim,
    follow_state,
    sweep_fills,
)
from tests.crash_child import B, block_data

ROOT = Path(__file__).resolve().parent.parent
NAME = "ab" * 16
READERS = 8


def _child(root: Path, mode: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.claim_child", str(root), NAME, mode]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _store(root: Path) -> BlobStore:
    return BlobStore([DriveInfo(root, 10**9, 0)], durable=False)


def _blob(store: BlobStore, digest: str) -> bytes:
    fd = store.open(digest)
    try:
        return os.pread(fd, B + 1, 0)
    finally:
        os.close(fd)


def test_one_filler_among_many_processes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    kids = [_child(tmp_path, "fill") for _ in range(READERS)]
    for k in kids:
        assert k.stdout is not None and k.stdout.readline().strip() == "ready"
    (tmp_path / "go").touch()
    outs = [k.communicate(timeout=60)[0].split() for k in kids]
    want = digest_of(block_data(0))
    assert all(k.returncode == 0 for k in kids), outs
    assert all(out[-2:] == ["ok", want] for out in outs), outs
    # every claim a process made is in its output; exactly one of them filled
    assert sum(out.count("fill") for out in outs) == 1, outs
    assert _blob(store, want) == block_data(0)
    assert not (tmp_path / "fills" / f"{NAME}.part").exists()


def test_kill_9_of_the_filler_is_taken_over(tmp_path: Path) -> None:
    store = _store(tmp_path)
    kid = _child(tmp_path, "hang")
    assert kid.stdout is not None
    (tmp_path / "go").touch()
    assert [kid.stdout.readline().strip() for _ in range(3)] == ["ready", "fill", "half"]
    follower = claim(tmp_path, NAME)
    try:
        assert follower.role is Role.FOLLOW
        assert follower.state() is Follow.GROWING
        assert os.pread(follower.fd, B, 0) == block_data(0)[: B // 2]
        os.kill(kid.pid, signal.SIGKILL)
        kid.wait(timeout=30)
        kid.stdout.close()
        assert follower.state() is Follow.ORPHANED
        held = claim(tmp_path, NAME)
        assert (held.role, held.took_over, held.size()) == (Role.FILL, True, 0)
        # the old inode is gone: its follower claims again rather than wait on it
        assert follower.state() is Follow.ABANDONED
        writer = ClaimedWriter(store, held)
        writer.write(block_data(0))
        digest = writer.commit()
        writer.close()
    finally:
        follower.close()
    assert digest == digest_of(block_data(0))
    assert _blob(store, digest) == block_data(0)


def test_follower_sees_done_after_the_name_moves_into_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path)
    held = claim(tmp_path, NAME)
    follower = claim(tmp_path, NAME)
    assert (held.role, follower.role) == (Role.FILL, Role.FOLLOW)
    writer = ClaimedWriter(store, held)
    writer.write(b"x" * 1000)
    assert follower.state() is Follow.GROWING
    writer.commit()
    writer.close()
    assert follower.state() is Follow.DONE
    assert os.pread(follower.fd, 2000, 0) == b"x" * 1000
    follower.close()


def test_filler_that_gives_up_abandons_its_followers(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = ClaimedWriter(store, claim(tmp_path, NAME))
    follower = claim(tmp_path, NAME)
    writer.write(b"y" * 10)
    writer.close()  # uncommitted: the name is removed
    assert follower.state() is Follow.ABANDONED
    follower.close()
    again = claim(tmp_path, NAME)
    assert (again.role, again.took_over) == (Role.FILL, False)
    again.close()


def test_a_done_orphan_is_replaced_not_refilled_in_place(tmp_path: Path) -> None:
    held = claim(tmp_path, NAME)
    os.write(held.fd, b"z" * 10)
    os.fchmod(held.fd, DONE_MODE)  # marked done, then died before the rename
    follower_fd = os.open(held.path, os.O_RDONLY)
    held.close()
    again = claim(tmp_path, NAME)
    assert (again.role, again.took_over, again.size()) == (Role.FILL, True, 0)
    assert os.pread(follower_fd, 20, 0) == b"z" * 10  # old readers keep their bytes
    os.close(follower_fd)
    again.close()
    assert sweep_fills([DriveInfo(tmp_path, 10**9, 0)]) == 1


def test_follower_cannot_write_and_names_are_checked(tmp_path: Path) -> None:
    store = _store(tmp_path)
    held = claim(tmp_path, NAME)
    follower = claim(tmp_path, NAME)
    with pytest.raises(ValueError):
        ClaimedWriter(store, follower)
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            claim(tmp_path, bad)
    follower.close()
    held.close()


@given(st.booleans(), st.booleans(), st.booleans())
def test_follow_table(done: bool, name_gone: bool, lock_free: bool) -> None:
    got = follow_state(done=done, name_gone=name_gone, lock_free=lock_free)
    if done:
        assert got is Follow.DONE
    elif name_gone:
        assert got is Follow.ABANDONED
    else:
        assert got is (Follow.ORPHANED if lock_free else Follow.GROWING)
