"""Give freed memory back to the system after a crowd leaves (glibc's allocator).

Fills allocate receive buffers of a few hundred KiB. glibc serves the first such
buffers from mappings of their own, then raises its mmap threshold and serves them
from the heap, where freed chunks stay resident: after a burst of clients the
process keeps its peak size. Fixing the threshold instead (``M_MMAP_THRESHOLD``)
costs a map, page faults and an unmap per buffer, about 30 % more CPU per cold byte
here; so mcc leaves the allocator alone on the hot path and calls ``malloc_trim(0)``,
which returns the free pages inside the heap too, every few seconds from a
housekeeping task. Elsewhere (musl, macOS) this is a no-op.

The cyclic garbage collector is the other pause: a full (oldest generation) pass
walks every container object alive, modules and the opened store included, and
under hit load that took 16-26 ms on the event loop (measured on a busy 2-core
machine), a stall of every connection. :func:`freeze_startup_objects` moves what a
started node holds for good out of the collector's walk (``gc.freeze``), after which
a full pass took 2-3 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

import trio

__all__ = ["TRIM_INTERVAL", "freeze_startup_objects", "periodic_trim", "trimmer"]

# Seconds between trims: a crowd's memory is back within this after it leaves; one
# trim of a quiet heap costs well under a millisecond.
TRIM_INTERVAL = 5.0


def trimmer() -> Callable[[], bool] | None:
    """glibc's ``malloc_trim(0)`` as a callable returning True when it released
    memory, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


async def periodic_trim(interval: float = TRIM_INTERVAL) -> None:
    """Trim the heap every ``interval`` seconds, forever (run it in a nursery)."""
    trim = trimmer()
    if trim is None:
        return
    while True:
        await trio.sleep(interval)
        trim()


def freeze_startup_objects() -> None:
    """Collect once, then exempt every object alive now from later collections (a
    node's modules, config and opened store live until it stops). Call it once,
    when the node has started; objects made later are collected as usual."""
    gc.collect()
    gc.freeze()
