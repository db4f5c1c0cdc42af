"""Moving body bytes from an upstream socket into a file with ``splice(2)``.

Theory of operation: a plain-HTTP body framed by Content-Length goes socket -> pipe
-> file without passing through Python: one :class:`Splicer` (a pipe) per fetch, and
per call one splice from the socket into the pipe (at most what the caller may take,
so never a byte past the span the framing promised) and then from the pipe to the
file at the caller's offset until the pipe is empty again. TLS cannot take this path
(the socket carries ciphertext), nor can a body whose framing h11 must read (chunked,
close-delimited): those are received into a buffer as before.

A write that fails (a full or failing drive) drains the pipe, so it never holds bytes
of one call into the next, and raises the OSError for the caller to fall back on
(see :mod:`mcc.engine.fill`).
"""

from __future__ import annotations

import fcntl
import os

import trio

__all__ = ["PIPE_SIZE", "FileWriteError", "Splicer"]

# The pipe's capacity, so one call moves as much as one receive into the fill's
# 256 KiB buffer would (Linux allows up to /proc/sys/fs/pipe-max-size, 1 MiB by
# default; when it refuses, the default 64 KiB stands).
PIPE_SIZE = 256 * 1024


class FileWriteError(Exception):
    """The file could not take spliced bytes (not the upstream's fault: the caller
    falls back to receiving into memory). ``cause`` is the OSError."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Splicer:
    """A pipe for moving socket bytes into files; use as a context manager."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass

    def __enter__(self) -> Splicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the pipe (once)."""
        if self._r >= 0:
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1

    async def move(self, sock: trio.socket.SocketType, fd: int, offset: int, count: int) -> int:
        """Move up to ``count`` bytes from ``sock`` into ``fd`` at ``offset``, waiting
        until some arrive; returns how many (0: the peer closed).

        Raises:
          OSError: the socket failed.
          FileWriteError: the file could not be written (nothing of the call is left
            in the pipe; the bytes it moved are lost).
        """
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                n = os.splice(sock.fileno(), self._w, count, flags=flags)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
        moved = 0
        try:
            while moved < n:
                moved += os.splice(
                    self._r, fd, n - moved, offset_dst=offset + moved, flags=os.SPLICE_F_MOVE
                )
        except OSError as exc:
            self._drain(n - moved)
            raise FileWriteError(exc) from None
        # a checkpoint, as trio's own socket calls make one: a body that is all there
        # already must not keep every other task waiting until it has all been moved
        await trio.lowlevel.cancel_shielded_checkpoint()
        return n

    def _drain(self, left: int) -> None:
        while left > 0:
            try:
                got = os.read(self._r, left)
            except OSError:
                return
            if not got:
                return
            left -= len(got)
