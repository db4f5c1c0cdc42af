"""Writing to a client socket: heads with MSG_MORE, bodies with zero-copy sendfile.

Only this module and ``server.py`` touch client sockets. The closing helpers
(:func:`send_final`, :func:`send_quiet`, :func:`linger`) live here too.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

__all__ = [
    "ClientStream",
    "SendfileBody",
    "linger",
    "push",
    "send_bytes",
    "send_final",
    "send_quiet",
    "sendfile",
]

ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]

# After an error response: how long, and how many bytes, to keep reading before close
# (nginx's lingering_close does the same, with 5 s).
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024

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


def push(sock: trio.socket.SocketType) -> None:
    """Send whatever the kernel is holding back now.

    sendfile(2) of less than the rest of a file marks its last segment "more to
    come" (MSG_MORE), and the kernel then holds that tail for up to 200 ms waiting
    for more. A range ending inside a block is exactly that case: without this, an
    unaligned range took 200 ms (measured: 57 req/s against nginx's 1,077). Setting
    TCP_NODELAY, even when already set, flushes what is pending.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # the connection is gone; the caller finds out on its next send


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
            # The socket counts as full once TCP_NOTSENT_LOWAT (trio sets 16 KiB) bytes
            # wait unsent, and a partial sendfile leaves them corked ("more to come"):
            # without a push it stays full until the kernel's 200 ms cork timer fires.
            push(sock)
            await trio.lowlevel.wait_writable(sock)
            continue
        if n == 0:  # the file ended early: never spin, never send short bodies quietly
            raise OSError(errno.EIO, "blob file shorter than its index entry")
        offset += n
        remaining -= n
        sent_total += n
    return sent_total


async def send_final(stream: ClientStream, data: bytes) -> None:
    """Send a last response on a connection about to close; a client gone is fine."""
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def send_quiet(stream: ClientStream, data: bytes) -> None:
    """Send a final response and close gently (see :func:`_linger`)."""
    await send_final(stream, data)
    await linger(stream)


async def linger(stream: ClientStream) -> None:
    """Close gently: stop sending, and read (and drop) what the client still sends for
    a moment, so that unread request bytes do not make the kernel reset the connection
    before the client has read the last response."""
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            if isinstance(stream, trio.SocketStream):  # TLS has no half-close
                await stream.send_eof()
            drained = 0
            while drained < _LINGER_BYTES:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                drained += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
