"""Scenario 6's client: N clients ask for the same cold range at once (trio + h11).

Prints one JSON object: time to first and last byte of every client (seconds).
Run as ``python -m benchmarks.coalesce PORT PATH START END CLIENTS``.
"""

from __future__ import annotations

import json
import sys

import h11
import trio


async def _one(port: int, path: str, start: int, end: int, go: trio.Event) -> tuple[float, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    request = conn.send(
        h11.Request(
            method="GET",
            target=path,
            headers=[("host", f"127.0.0.1:{port}"), ("range", f"bytes={start}-{end}")],
        )
    )
    request = (request or b"") + (conn.send(h11.EndOfMessage()) or b"")
    await go.wait()
    t0 = trio.current_time()
    await stream.send_all(request)
    first = last = 0.0
    got = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 20))
        elif isinstance(event, h11.Data):
            if not got:
                first = trio.current_time() - t0
            got += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            last = trio.current_time() - t0
            break
        elif isinstance(event, h11.Response) and event.status_code != 206:
            raise RuntimeError(f"status {event.status_code}")
    await stream.aclose()
    if got != end - start + 1:
        raise RuntimeError(f"got {got} bytes, wanted {end - start + 1}")
    return first, last


async def run(port: int, path: str, start: int, end: int, clients: int) -> dict[str, list[float]]:
    results: list[tuple[float, float]] = []
    go = trio.Event()

    async def client() -> None:
        results.append(await _one(port, path, start, end, go))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        await trio.sleep(0.2)  # every connection made and waiting
        go.set()
    return {"first": [r[0] for r in results], "last": [r[1] for r in results]}


def main() -> None:
    port, path, start, end, clients = sys.argv[1:6]
    print(json.dumps(trio.run(run, int(port), path, int(start), int(end), int(clients))))


if __name__ == "__main__":
    main()
