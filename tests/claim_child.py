"""A worker-like process for tests/test_claims.py: claims one block fill and fills or
follows it.

Run as ``python -m tests.claim_child ROOT NAME fill`` (as filler, write the block in
pieces and commit it, unless the blob is there already; as follower, read it as it
grows and check every byte) or ``python -m tests.claim_child ROOT NAME hang`` (claim
as filler, write half the block, say ``half`` and wait to be killed). It says
``ready``, waits for ROOT/go, prints its role, then ``ok <digest>`` or ``bad ...``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mcc.store.blobs import BlobStore, DriveInfo, digest_of
from mcc.store.claims import ClaimedWriter, Follow, Role, claim
from tests.crash_child import B, block_data

PIECES = 16
POLLS = 4000  # bounded follow loop: 4000 x 5 ms = 20 s at most
CLAIMS = 20


def _fill(store: BlobStore, held: object) -> str:
    writer = ClaimedWriter(store, held)  # type: ignore[arg-type]
    data = block_data(0)
    step = B // PIECES
    for i in range(PIECES):
        writer.write(data[i * step : (i + 1) * step])
        time.sleep(0.005)
    digest = writer.commit()
    writer.close()
    return digest


def main(argv: list[str]) -> int:
    root, name, mode = Path(argv[0]), argv[1], argv[2]
    store = BlobStore([DriveInfo(root, 10**9, 0)], durable=False)
    want = block_data(0)
    print("ready", flush=True)
    for _ in range(POLLS):  # a start gate, so that the claims meet
        if (root / "go").exists():
            break
        time.sleep(0.005)
    digest = digest_of(want)
    for _ in range(CLAIMS):
        if store.exists(digest):  # what the engine's index look-up does first
            print(f"hit ok {digest}", flush=True)
            return 0
        held = claim(root, name)
        if held.role is Role.FILL and store.exists(digest):
            ClaimedWriter(store, held).close()  # committed just before our claim
            continue
        print(held.role.value, flush=True)
        if held.role is Role.FILL:
            if mode == "hang":
                ClaimedWriter(store, held).write(want[: B // 2])
                print("half", flush=True)
                time.sleep(60)
                return 1
            print(f"ok {_fill(store, held)}", flush=True)
            return 0
        for _ in range(POLLS):
            state = held.state()
            if state is not Follow.GROWING:
                break
            got = os.pread(held.fd, B, 0)
            if got != want[: len(got)]:
                print(f"bad bytes while growing ({len(got)})", flush=True)
                return 1
            time.sleep(0.005)
        if state is Follow.DONE:
            got = os.pread(held.fd, B + 1, 0)
            held.close()
            print(f"ok {digest_of(got)}" if got == want else f"bad done ({len(got)})", flush=True)
            return 0
        held.close()  # abandoned or orphaned: claim again
    print("bad: no claim settled", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
