"""A master for tests/test_supervisor.py: binds one listening socket, then
supervises WORKERS forked workers that each serve it with trio, answering every
connection with ``<index> <pid>``.

Run as ``python -m tests.supervise_child WORKERS``. It prints ``port <n>`` once
bound and ``worker <index> <pid>`` as each worker starts; each worker ends cleanly
on SIGTERM, and the master's exit status is :func:`supervise`'s.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import trio

from mcc.ops.supervisor import supervise


def _serve(sock: socket.socket, index: int) -> int:
    async def main() -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.send_all(f"{index} {os.getpid()}\n".encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, answer, [listener])
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    os.write(1, f"worker {index} {os.getpid()}\n".encode())  # one write: lines never mix
    trio.run(main)
    return 0


def main(argv: list[str]) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    print(f"port {sock.getsockname()[1]}", flush=True)
    return supervise(int(argv[0]), lambda index: _serve(sock, index))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
