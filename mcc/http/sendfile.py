"""Writing to a client socket: heads with MSG_MORE, bodies with zero-copy sendfile.

Only this module and ``server.py`` touch client sockets. The closing helpers
(:func:`send_final`, :func:`send_quiet`, :func:`linger`) live here too.

On a plain socket a hit's reads and writes go to the standard-library socket under
trio's (:func:`raw_socket`): trio's own calls add a schedule point after every
successful call and a cancel scope per timeout, about a tenth of a small hit's time.
Here a call that the kernel takes at once costs no more than the syscall, and a
cancel scope is made only when a call has to wait. A response still yields once,
after its head (see ``Responses._send_head``), and a read that finds bytes waiting
once (``Server._read_head``). Measured with 64 connections of 64 KiB hits: with no
yield between head and body each response ran to its end in one step, and the p99
latency was 2-3 times worse, with no more requests served.
"""

from __future__ import annotations

import errno
import math
import os
import socket

import trio

__all__ = [
    "ClientStream",
    "SendfileBody",
    "linger",
    "push",
    "raw_socket",
    "receive_nowait",
    "send_bytes",
    "send_final",
    "send_quiet",
    "sendfile",
    "socket_stream",
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


def socket_stream(stream: ClientStream) -> trio.SocketStream:
    """The TCP stream under ``stream`` (itself, or what TLS runs over)."""
    return stream.transport_stream if isinstance(stream, trio.SSLStream) else stream


def raw_socket(sock: trio.socket.SocketType) -> socket.socket | None:
    """The standard-library socket under trio's, for calls without trio's schedule
    points (non-blocking, as trio set it); None when trio keeps none where expected
    (callers then go through trio)."""
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def receive_nowait(raw: socket.socket, size: int) -> bytes | None:
    """Bytes the client sent that are waiting now (``b""``: it closed), or None when
    none are: then wait with ``trio.lowlevel.wait_readable``. Not a schedule point:
    the caller yields once per request.

    Raises:
      trio.BrokenResourceError: the connection broke (reset, or closed under us).
    """
    try:
        return raw.recv(size)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"receive failed: {exc}") from exc


async def send_bytes(
    sock: trio.socket.SocketType,
    data: bytes,
    *,
    more: bool = False,
    raw: socket.socket | None = None,
    limit: float = math.inf,
) -> None:
    """Send all of ``data``; ``more`` tells the kernel a body follows (MSG_MORE), so a
    small head and the first body bytes leave in one packet despite TCP_NODELAY.
    Through ``raw`` (:func:`raw_socket`) when given: then a send the kernel takes at
    once is no schedule point, and waits for room are bounded by ``limit`` seconds.

    Raises:
      trio.TooSlowError: the socket had no room for ``limit`` seconds.
      OSError: the connection broke.
    """
    flags = socket.MSG_MORE if more and _HAS_MSG_MORE else 0
    view = memoryview(data)
    if raw is None:
        while view:
            sent = await sock.send(view, flags)
            view = view[sent:]
        return
    await trio.lowlevel.checkpoint_if_cancelled()
    deadline = math.inf
    while view:
        try:
            sent = raw.send(view, flags)
        except BlockingIOError:
            if deadline == math.inf:
                deadline = trio.current_time() + limit
            await _wait_writable(sock, deadline)
            continue
        view = view[sent:]


async def _wait_writable(sock: trio.socket.SocketType, deadline: float) -> None:
    """Wait for room in the socket's buffer until ``deadline`` (trio's clock).

    Raises:
      trio.TooSlowError: no room came in time.
    """
    with trio.move_on_at(deadline) as scope:
        await trio.lowlevel.wait_writable(sock)
    if scope.cancelled_caught:
        raise trio.TooSlowError


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


async def sendfile(
    sock: trio.socket.SocketType, body: SendfileBody, limit: float = math.inf
) -> int:
    """Copy ``body`` from its file to the socket in the kernel; returns bytes sent.
    Waits for room in the socket are bounded by ``limit`` seconds in all (counted
    from the first wait: a body the kernel takes at once makes no cancel scope).

    Raises:
      trio.TooSlowError: the client read too slowly.
      OSError: the file is shorter than promised (EIO), or the socket broke.
    """
    fd, offset, remaining = body.fd, body.offset, body.length
    out = sock.fileno()
    sent_total = 0
    deadline = math.inf
    while remaining:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            n = os.sendfile(out, fd, offset, remaining)
        except BlockingIOError:
            # The socket counts as full once TCP_NOTSENT_LOWAT (trio sets 16 KiB) bytes
            # wait unsent, and a partial sendfile leaves them corked ("more to come"):
            # without a push it stays full until the kernel's 200 ms cork timer fires.
            push(sock)
            if deadline == math.inf:
                deadline = trio.current_time() + limit
            await _wait_writable(sock, deadline)
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
