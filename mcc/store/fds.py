"""Open blob fds kept for reuse, shared by concurrent readers.

Theory of operation: ``sendfile`` takes an explicit offset, so one open fd serves any
number of concurrent readers of a blob. :class:`FdCache` keeps up to ``limit`` of them
by digest, each with its count of users; the least recently used ones nobody uses are
closed past the limit.

An fd is closed only when nobody uses it: closing one under a reader would cut its
response, and worse, the fd's number may be given to the next file opened, whose
bytes that reader would then send (or which a second close would close). So a blob
whose file goes away (deleted, quarantined, changed by another worker) is *retired*:
no longer handed out, and closed by the last of its users to hand it back.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator

__all__ = ["FdCache"]


class FdCache:
    """Blob fds by digest, with their users (see the module)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # digest -> [fd, users]
        self._retired: dict[int, int] = {}  # fd -> users, for fds no longer handed out

    def acquire(self, digest: str, opener: Callable[[str], int]) -> int:
        """The cached fd of ``digest`` (opened with ``opener`` when there is none),
        with one more user; hand it back with :meth:`release`."""
        entry = self._fds.get(digest)
        if entry is None:
            entry = [opener(digest), 1]
            self._fds[digest] = entry
            self._trim()  # (ours counts as used: never the one closed)
        else:
            self._fds.move_to_end(digest)
            entry[1] += 1
        return entry[0]

    def __contains__(self, digest: str) -> bool:
        return digest in self._fds

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._fds))

    def release(self, digest: str, fd: int) -> None:
        """One user of ``fd`` (from :meth:`acquire`) is done with it."""
        entry = self._fds.get(digest)
        if entry is not None and entry[0] == fd:
            entry[1] -= 1
            self._trim()
            return
        users = self._retired.pop(fd, 0) - 1
        if users > 0:
            self._retired[fd] = users
        else:
            os.close(fd)  # its last user: retired meanwhile

    def retire(self, digest: str) -> None:
        """Stop handing out ``digest``'s fd; closed now if unused, else by its last user."""
        entry = self._fds.pop(digest, None)
        if entry is None:
            return
        if entry[1] > 0:
            self._retired[entry[0]] = entry[1]
        else:
            os.close(entry[0])

    def _trim(self) -> None:
        if len(self._fds) <= self.limit:
            return
        for digest in list(self._fds):
            if len(self._fds) <= self.limit:
                break
            if self._fds[digest][1] == 0:
                os.close(self._fds.pop(digest)[0])

    def close(self) -> None:
        """Close every fd, in use or not (the store is closing)."""
        for fd, _ in self._fds.values():
            os.close(fd)
        for fd in self._retired:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()
