"""A process that fills a store and dies at a chosen commit step, recording its fsyncs.

Run as ``python -m tests.crash_child RECORD CACHE_DIR STEP BLOCKS DURABLE``, or as
``python -m tests.crash_child serve RECORD COMMITTED MCC-SERVE-ARGS...`` for a whole
node that appends ``<key> <block>`` to COMMITTED each time a block's commit ends. Every
``os.fsync`` it makes is appended to RECORD as ``<inode> <length>``; with that list,
:func:`power_loss` then does to the cache what a power cut does to a file system that
keeps unsynced data in its own cache (the failure measured in issue 22): each file is
cut back to its length at its last fsync (0 when never synced). The process stores
``BLOCKS`` blocks of one object and, at block ``CRASH_AT`` and commit step ``STEP``
(``none``: never), leaves with ``os._exit`` (no cleanup: no sqlite close, no temp
file removal, as ``kill -9``). Blocks are :func:`block_data`, so the test knows them.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

B = 65536
CRASH_AT = 2  # blocks 0 and 1 are committed before the crash
CRASHED = 17  # the exit status of a crash
KEY = "http://origin.test/object"


def block_data(idx: int) -> bytes:
    """The bytes of block ``idx`` (the same in every process)."""
    return random.Random(idx).randbytes(B)


def _record_fsyncs(record: Path) -> None:
    out = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        st = os.fstat(fd)
        os.write(out, f"{st.st_ino} {st.st_size}\n".encode())

    os.fsync = fsync  # type: ignore[assignment]


def power_loss(record: Path, cache_dir: Path) -> None:
    """Cut every blob file and the index's WAL back to its length at its last fsync
    (the database file itself is written only by checkpoints, which sync it), and
    date every file back, as if the crash were long ago."""
    synced: dict[int, int] = {}
    if record.exists():
        for line in record.read_text().splitlines():
            ino, size = map(int, line.split())
            synced[ino] = size
    wal = cache_dir / "index.sqlite3-wal"
    files = [*(cache_dir / "blobs").glob("*/*/*"), *([wal] if wal.exists() else [])]
    for p in files:
        keep = synced.get(p.stat().st_ino, 0)
        if p.stat().st_size > keep:
            os.truncate(p, keep)
    (cache_dir / "index.sqlite3-shm").unlink(missing_ok=True)  # memory, in effect
    for p in cache_dir.rglob("*"):
        os.utime(p, (1, 1))


def _main(record: Path, cache_dir: Path, step: str, blocks: int, durable: bool) -> None:
    _record_fsyncs(record)
    import trio

    from mcc.store.blobs import DriveInfo
    from mcc.store.records import ObjectMeta
    from mcc.store.store import Store

    store = Store([DriveInfo(cache_dir, 10**9, 0)], block_size=B, durable=durable)
    wal = Path(f"{store.index.path}-wal")
    if wal.exists():  # the schema was committed with synchronous=FULL (synced by sqlite)
        st = wal.stat()
        with record.open("a") as f:
            f.write(f"{st.st_ino} {st.st_size}\n")
    current = 0

    def fault(at: str) -> None:
        if at == step and current == CRASH_AT:
            os._exit(CRASHED)

    store.blobs.fault = fault
    store.commits.fault = fault
    meta = ObjectMeta(KEY, "s:1", blocks * B, block_size=B)

    async def fill() -> None:
        nonlocal current
        assert store.put_object(meta)
        for i in range(blocks):
            current = i
            writer = store.writer()
            writer.write(block_data(i))
            assert await store.commit(meta, i, writer)
            writer.close()
            if not durable:
                # the unlucky half of issue 22's cycles: the index was checkpointed
                store.index.checkpoint()

    trio.run(fill)
    os._exit(0)  # a crash after the last commit: nothing closed


def _serve(record: Path, committed: Path, argv: list[str]) -> int:
    _record_fsyncs(record)
    from mcc.cli import main
    from mcc.store.records import ObjectMeta
    from mcc.store.store import Store

    out = os.open(committed, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    commit = Store.commit

    async def committing(self: Store, meta: ObjectMeta, idx: int, source: object) -> bool:
        ok = await commit(self, meta, idx, source)  # type: ignore[arg-type]
        if ok:
            os.write(out, f"{meta.key} {idx}\n".encode())
        return ok

    Store.commit = committing  # type: ignore[method-assign]
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.exit(_serve(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]))
    _main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
