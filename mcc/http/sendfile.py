"""Writing to a client socket: heads with MSG_MORE, bodies with zero-copy sendfile.

Only this module and ``server.py`` touch client sockets.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

__all__ = ["SendfileBody", "send_bytes", "sendfile"]

_HAS_MSG_MORE = hasattr(socket, "MSG_MORE")


class SendfileBody:
    """A body piece h11 passes through untouched (it only needs ``len()``)."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length


async def send_bytes(sock: trio.socket.SocketType, data: bytes, *, more: bool = False) -> None:
    """Send all of ``data``; ``more`` tells the kernel a body follows (MSG_MORE), so a
    small head and the first body bytes leave in one packet despite TCP_NODELAY."""
    flags = socket.MSG_MORE if more and _HAS_MSG_MORE else 0
    view = memoryview(data)
    while view:
        sent = await sock.send(view, flags)
        view = view[sent:]


async def sendfile(sock: trio.socket.SocketType, body: SendfileBody) -> int:
    """Copy ``body`` from its file to the socket in the kernel; returns bytes sent.

    Raises:
      OSError: the file is shorter than promised (EIO), or the socket broke.
    """
    fd, offset, remaining = body.fd, body.offset, body.length
    out = sock.fileno()
    sent_total = 0
    while remaining:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            n = os.sendfile(out, fd, offset, remaining)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if n == 0:  # the file ended early: never spin, never send short bodies quietly
            raise OSError(errno.EIO, "blob file shorter than its index entry")
        offset += n
        remaining -= n
        sent_total += n
    return sent_total
