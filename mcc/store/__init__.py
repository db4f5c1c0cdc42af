"""Content-addressed blob files plus the sqlite index that names them."""

from .blobs import BlobStore
from .index import Index

__all__ = ["BlobStore", "Index"]
