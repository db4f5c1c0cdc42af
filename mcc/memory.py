"""Give freed memory back to the system (glibc's allocator, tuned once at start).

Fills allocate receive buffers of a few hundred KiB. glibc serves requests above
``M_MMAP_THRESHOLD`` with their own mapping, returned on free, but it raises that
threshold dynamically after the first such free, after which the buffers come from
the heap and a burst of clients leaves the heap grown for good. A server
that must come back to its baseline after a crowd leaves fixes both thresholds
instead (the same knobs as the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables). Elsewhere (musl, macOS) this is a
no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["release_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 128 * 1024


def release_freed_memory() -> bool:
    """Make glibc map large buffers on their own and trim the heap eagerly; True
    when the allocator took the settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1 and ok)
