"""An exclusive lock on each cache directory: one process owns a cache at a time.

Theory of operation: the owner holds ``<drive>/mcc.lock`` open and locked with
``flock(LOCK_EX | LOCK_NB)`` for as long as it uses the drive, and writes its PID
into the file so that a refused process can name the holder. The kernel drops the
lock when the file is closed or the process ends, however it ends (no stale lock
after SIGKILL), so the file itself is never deleted: deleting it would let a third
process lock a fresh inode while the holder still runs.

``flock`` locks belong to the open file, not to the process: two opens in one
process exclude each other too, so a library user opening the same cache twice is
refused just as a second server is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import McError

__all__ = ["LOCK_NAME", "CacheLocked", "DriveLock", "lock_drives"]

LOCK_NAME = "mcc.lock"


class CacheLocked(McError):
    """Another process holds the cache directory's lock.

    Args:
      root: the cache directory.
      pid: the holder's PID as written in the lock file, or None when unreadable.
    """

    def __init__(self, root: Path, pid: int | None) -> None:
        who = f"PID {pid}" if pid is not None else "an unknown PID"
        super().__init__(f"cache directory {root} is in use by another mcc process ({who})")
        self.root = root
        self.pid = pid


class DriveLock:
    """The lock of one cache directory (created if missing).

    Args:
      root: the cache directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting and write our PID into it.

        Raises:
          CacheLocked: another open file holds it.
          OSError: the directory or the lock file cannot be created.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # held read-only: a file open for writing would keep the drive from being
        # remounted read-only (flock does not care about the open mode)
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise CacheLocked(self.root, pid) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            # a second open file: closing it leaves the lock (held by ``fd``) alone
            self.path.write_text(f"{os.getpid()}\n")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let the lock go (closing the file drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if (text.isascii() and text.isdigit()) else None


@contextlib.contextmanager
def lock_drives(roots: Iterable[Path]) -> Iterator[list[DriveLock]]:
    """Lock every cache directory for the block; all or none.

    Raises:
      CacheLocked: one of them is held by another process (the ones taken are released).
      OSError: a directory cannot be created.
    """
    locks: list[DriveLock] = []
    try:
        for root in roots:
            lock = DriveLock(root)
            lock.acquire()
            locks.append(lock)
        yield locks
    finally:
        for lock in locks:
            lock.release()
