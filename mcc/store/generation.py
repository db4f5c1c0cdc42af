"""The store's generation: one counter shared by every process using a cache directory.

Not wired into the store yet (issue 17 item 1, ``--workers N``): with several worker
processes, each keeps in-memory maps (object records, open blob fds) that must not
outlive a purge or an eviction done by another worker. The plan: every change that
can make such a map wrong (a commit, an eviction, a purge) bumps the generation, and a
worker compares the generation it last saw before serving from its maps, reloading
them when it moved.

Theory of operation: the counter is 8 bytes, little-endian, at offset 0 of
``<drive>/mcc.generation``, mapped shared into every process. Reading it is one
aligned 8-byte load from the mapping (no system call: it sits on the hit path).
Bumping it takes ``flock(LOCK_EX)`` on the file (other processes) and a thread lock
(other threads of this process: flock does not exclude users of one open file), so
no bump is lost. The counter only grows; a new file starts it at 0 (a short one is
zero-extended).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from pathlib import Path

__all__ = ["GENERATION_NAME", "Generation"]

GENERATION_NAME = "mcc.generation"
_COUNTER = struct.Struct("<Q")


class Generation:
    """The shared generation counter of the cache directory ``root``.

    Args:
      root: the cache directory (it must exist).

    Raises:
      OSError: the file cannot be opened or mapped (``ELOOP`` when a symlink was
        planted in its place: never followed).
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / GENERATION_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._fd).st_size < _COUNTER.size:
                    os.ftruncate(self._fd, _COUNTER.size)  # zero-filled: generation 0
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(self._fd, _COUNTER.size)
        except BaseException:
            os.close(self._fd)
            raise
        self._thread_lock = threading.Lock()

    def current(self) -> int:
        """The generation now (no system call)."""
        value: int = _COUNTER.unpack_from(self._map, 0)[0]
        return value

    def moved(self, seen: int) -> bool:
        """Has any process bumped the generation since it was ``seen``?"""
        return self.current() != seen

    def bump(self) -> int:
        """Add one, for every process to see; returns the new generation (blocking
        for as long as another process bumps: a few microseconds)."""
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                value = self.current() + 1
                _COUNTER.pack_into(self._map, 0, value)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return value

    def close(self) -> None:
        """Unmap and close the file."""
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)
