"""mcc: a trio-based HTTP cache server for large downloads.

The public API, all an embedder needs::

    async with mcc.open_cache(cache_dir="cache", allow_origins=["example.org"]) as cache:
        async for chunk in cache.read("http://example.org/big.iso", 0, 1023):
            ...
"""

from ._version import __version__
from .config import Config, Drive, HostPort, Limits, Timeouts, load_config
from .engine.blocks import ObjectMeta
from .engine.engine import Cache, FileSlice, ObjectInfo, Statistics
from .engine.opening import open_cache
from .errors import (
    BadRequest,
    ConfigError,
    McError,
    NotCacheable,
    RangeNotSatisfiable,
    UpstreamError,
    VersionChanged,
)
from .store.blobs import BlobStore
from .store.index import Index

__all__ = [
    "BadRequest",
    "BlobStore",
    "Cache",
    "Config",
    "ConfigError",
    "Drive",
    "FileSlice",
    "HostPort",
    "Index",
    "Limits",
    "McError",
    "NotCacheable",
    "ObjectInfo",
    "ObjectMeta",
    "RangeNotSatisfiable",
    "Statistics",
    "Timeouts",
    "UpstreamError",
    "VersionChanged",
    "__version__",
    "load_config",
    "open_cache",
]
