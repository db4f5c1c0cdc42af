"""Listening sockets bound once by the master of a node of several workers.

Theory of operation: before it forks, the master binds every client listener once
per worker, each with ``SO_REUSEPORT`` on the same port (port 0: the port the first
one got), so the kernel spreads new connections over the workers by their address
hash, and a restarted worker finds the socket of its predecessor, its queued
connections included. The admin listener is bound once, for worker 0. A worker
hands its sockets to :func:`adopt` before its trio run; :func:`open_tcp_listeners`
then gives those for a (host, port) asked, and binds anew for any other.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import trio

__all__ = ["Bound", "adopt", "bind", "open_tcp_listeners"]

# what trio asks for too: the kernel caps it at net.core.somaxconn
_BACKLOG = 0xFFFF
# (host, port) as configured -> sockets this process serves it with
_ADOPTED: dict[tuple[str, int], list[socket.socket]] = {}

Bound = dict[tuple[str, int], list[socket.socket]]


def bind(host: str, port: int, copies: int = 1) -> list[list[socket.socket]]:
    """Bind ``host:port`` as trio's ``open_tcp_listeners`` does (every address it
    resolves to), ``copies`` times with ``SO_REUSEPORT`` when more than one.

    Returns:
      One list of sockets per copy.

    Raises:
      OSError: the address cannot be resolved or bound (message names it).
    """
    out: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, addr in infos:
            chosen = addr
            for copy in out:
                sock = socket.socket(family, kind, proto)
                copy.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if copies > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(chosen)
                sock.listen(_BACKLOG)
                chosen = sock.getsockname()  # port 0: every copy on the port we got
    except OSError as exc:
        for copy in out:
            for sock in copy:
                sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return out


def adopt(bound: Bound) -> None:
    """Serve these (host, port) addresses with these sockets in this process."""
    _ADOPTED.clear()
    _ADOPTED.update(bound)


async def open_tcp_listeners(port: int, *, host: str) -> list[trio.SocketListener]:
    """The listeners of ``host:port``: the adopted sockets, or new ones.

    Raises:
      OSError: as :func:`trio.open_tcp_listeners`.
    """
    socks: Sequence[socket.socket] | None = _ADOPTED.get((host, port))
    if socks is None:
        return await trio.open_tcp_listeners(port, host=host)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s.dup())) for s in socks]
