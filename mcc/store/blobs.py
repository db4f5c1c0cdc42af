"""Blob files named by the BLAKE3 digest of their content.

Theory of operation: a blob is written to ``<drive>/tmp/``, fsynced (a durable
store) and renamed to ``<drive>/blobs/<d[0:2]>/<d[2:4]>/<digest>``, so a blob file is
either whole or absent: a crash mid-write leaves only a temp file, which
:meth:`BlobStore.sweep_tmp` removes at the next start. The rename itself lasts once
its folder is fsynced, which the store's group commit does (:mod:`.commits`). The
digest is the name, so equal blocks under different URLs are one file, and a reader
can check a blob against its name at any time.

A blob lives on one drive, chosen by weighted rendezvous hashing of its digest over
the drives (weight = the drive's ``max_size``): the choice is stable across restarts
and adding a drive moves only the blobs that now belong to it.

Everything here is blocking file I/O; the engine calls it through ``trio.to_thread``
where a call may take long (writes, hashing) and directly where it is one syscall.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import attrs
import blake3

from .fds import FdCache

__all__ = ["BlobStore", "BlockWriter", "DriveInfo", "FaultHook", "Step", "digest_of", "fsync_dir"]

# The steps of a commit a fault hook is called at (tests crash the store there):
# "written": the temp file is written and fsynced, not yet renamed;
# "renamed": the blob is under its name, its folder not yet fsynced, no index row;
# "indexed": the batch's rows are in the index (visible), the WAL not yet fsynced.
Step = Literal["written", "renamed", "indexed"]
FaultHook = Callable[[Step], None]

_READ_CHUNK = 1024 * 1024
# Blob fds kept open for reuse: enough for a hot set, far below the fd limit.
_CACHED_FDS = 1024


def digest_of(data: bytes | bytearray | memoryview) -> str:
    """The hex BLAKE3 digest that names ``data``."""
    return str(blake3.blake3(data).hexdigest())


@attrs.frozen
class DriveInfo:
    """One cache drive as the store sees it."""

    root: Path
    max_size: int
    min_free: int


class BlobStore:
    """Blob files across one or more drives.

    Args:
      drives: the drives, each with a root folder (created if missing).
      durable: fsync each blob file before it is renamed into place (off: the page
        cache alone carries it; a power loss may leave it empty under its name).

    Raises:
      OSError: when a drive folder cannot be created.
    """

    def __init__(self, drives: Sequence[DriveInfo], *, durable: bool = True) -> None:
        if not drives:
            raise ValueError("drives: at least one drive is needed")
        self.drives = tuple(drives)
        for d in self.drives:
            d.root.mkdir(parents=True, exist_ok=True)
            for sub in ("blobs", "tmp", "quarantine"):
                _real_dir(d.root / sub)
            if durable:  # their names, on a new drive
                fsync_dir(d.root)
        self.durable = durable
        self.fault: FaultHook | None = None  # tests: called at each commit step
        self._made_dirs: set[Path] = set()
        self._roots = [str(d.root) for d in self.drives]
        self.fds = FdCache(_CACHED_FDS)  # open blob fds kept for reuse (see fds.py)

    def drive_for(self, digest: str) -> DriveInfo:
        """The drive a blob lives on (weighted rendezvous hash of its digest)."""
        if len(self.drives) == 1:
            return self.drives[0]
        best, best_score = self.drives[0], -math.inf
        for d in self.drives:
            h = int(digest_of(f"{d.root}\0{digest}".encode())[:15], 16)
            u = (h + 1) / (16**15 + 1)  # in (0, 1)
            score = -d.max_size / math.log(u)
            if score > best_score:
                best, best_score = d, score
        return best

    def drive_index(self, digest: str) -> int:
        """The position in ``drives`` of the drive a blob lives on."""
        return self.drives.index(self.drive_for(digest))

    def path(self, digest: str) -> Path:
        """Where the blob named ``digest`` lives (whether or not it exists)."""
        return Path(self._path_str(digest))

    def _path_str(self, digest: str) -> str:
        # a plain string join: this runs on every cache hit
        root = self._roots[0] if len(self._roots) == 1 else str(self.drive_for(digest).root)
        return f"{root}/blobs/{digest[0:2]}/{digest[2:4]}/{digest}"

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Write a blob (if not already present) and return its digest.

        Raises:
          OSError: ENOSPC and friends; no partial blob is ever left under its name.
        """
        return self.put_durably(data)[0]

    def put_durably(self, data: bytes | bytearray | memoryview) -> tuple[str, tuple[Path, ...]]:
        """:meth:`put`, also returning the folders to fsync for its name to last.

        Raises:
          OSError: as :meth:`put`.
        """
        writer = self.writer(self.drive_for(digest_of(data)))
        try:
            writer.write(data)
            return writer.commit(), writer.dirs
        finally:
            writer.close()

    def writer(self, drive: DriveInfo | None = None) -> BlockWriter:
        """A new block file on ``drive`` (the first by default), to fill and commit.

        Raises:
          OSError: the temp file cannot be created (ENOSPC, a read-only drive).
        """
        return BlockWriter(self, drive or self.drives[0])

    def _install(self, tmp: Path, fd: int, digest: str, length: int) -> tuple[Path, ...]:
        """Move a written temp file to the blob path of ``digest``. A file already
        there is kept only when it is that blob (its length and digest checked: a
        planted or torn file is replaced, never trusted by name).

        Returns:
          The folders whose entries changed (to fsync for the blob's name to last).
        """
        final = self.path(digest)
        dirs = [final.parent]
        if final.parent not in self._made_dirs:
            _real_dir(final.parent.parent)
            _real_dir(final.parent)
            self._made_dirs.add(final.parent)
            dirs += [final.parent.parent, final.parent.parent.parent]
        if self._holds(final, digest, length):
            tmp.unlink()
            return tuple(dirs)
        target = self.drive_for(digest).root
        if tmp.parent.parent != target:  # another drive: copy onto it first
            copy = _exclusive_temp(target / "tmp")
            try:
                _copy_fd(fd, copy[1], length)
                if self.durable:
                    os.fsync(copy[1])
            finally:
                os.close(copy[1])
            tmp.unlink()
            tmp = copy[0]
        if self.fault is not None:
            self.fault("written")
        os.replace(tmp, final)
        return tuple(dirs)

    def _holds(self, path: Path, digest: str, length: int) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != length or not self.verify(digest, fd):
                return False
            if self.durable:  # it may be a blob whose rename is not durable yet
                os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def open(self, digest: str) -> int:
        """Open a blob for reading and return the fd (the caller closes it).

        Raises:
          FileNotFoundError: the blob is not there.
          OSError: ``ELOOP`` when a symlink was planted in its place (never followed).
        """
        return os.open(self._path_str(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def acquire(self, digest: str) -> int:
        """An fd of the blob, shared and cached; hand it back with :meth:`release`.

        Raises:
          FileNotFoundError: the blob is not there.
        """
        return self.fds.acquire(digest, self.open)

    def is_open(self, digest: str) -> bool:
        """True when an fd of the blob is cached (readable even if the file is gone)."""
        return digest in self.fds

    def release(self, digest: str, fd: int) -> None:
        """Hand back an fd from :meth:`acquire`."""
        self.fds.release(digest, fd)

    def forget_fd(self, digest: str) -> None:
        """Stop caching ``digest``'s fd (its file is going away); users keep theirs,
        the last of them closes it."""
        self.fds.retire(digest)

    def close(self) -> None:
        """Close every cached fd."""
        self.fds.close()

    def exists(self, digest: str) -> bool:
        """True when the blob file is present (a plain file, not a planted link)."""
        return self.size_of(digest) is not None

    def size_of(self, digest: str) -> int | None:
        """The blob file's length, or None when it is missing (or not a plain file)."""
        try:
            st = os.lstat(self._path_str(digest))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def verify(self, digest: str, fd: int | None = None) -> bool:
        """Re-hash the blob (through ``fd`` when given: the file it names may have been
        evicted and deleted since it was opened); True when it matches its name."""
        h = blake3.blake3()
        if fd is not None:
            offset = 0
            while chunk := os.pread(fd, _READ_CHUNK, offset):
                h.update(chunk)
                offset += len(chunk)
            return bool(h.hexdigest() == digest)
        try:
            own = os.open(self._path_str(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # missing, or a symlink planted in its place
            return False
        try:
            return self.verify(digest, own)
        finally:
            os.close(own)

    def quarantine(self, digest: str) -> bool:
        """Move a corrupt blob aside (kept, never served); True when it was there."""
        self.forget_fd(digest)
        src = self.path(digest)
        dst = self.drive_for(digest).root / "quarantine" / digest
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            return False
        return True

    def delete(self, digest: str) -> int:
        """Remove a blob; returns the bytes freed (0 when it was already gone). Safe in
        a worker thread; call :meth:`forget_fd` first, on the owning thread."""
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def sweep_tmp(self) -> int:
        """Remove temp files left by a crash mid-write; returns how many."""
        removed = 0
        for d in self.drives:
            for p in (d.root / "tmp").iterdir():
                try:
                    p.unlink()
                    removed += 1
                except OSError:
                    pass
        return removed

    def iter_blob_files(self) -> Iterator[tuple[str, float, int]]:
        """Every blob file on any drive as (digest, modification time, length)."""
        for d in self.drives:
            for p in (d.root / "blobs").glob("*/*/*"):
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                yield p.name, st.st_mtime, st.st_size

    def iter_digests(self) -> Iterator[str]:
        """Every blob digest present on any drive (walks the folders)."""
        for d in self.drives:
            for p in (d.root / "blobs").glob("*/*/*"):
                yield p.name

    def free_space(self, drive: DriveInfo) -> int:
        """Bytes free on the filesystem holding ``drive``."""
        return shutil.disk_usage(drive.root).free


class BlockWriter:
    """One block on its way to the store: a temp file that readers may read (``fd``,
    at offsets below ``length``) while it is still being written.

    The file is created with ``O_EXCL | O_NOFOLLOW`` under a random name, so nothing
    planted in ``tmp/`` (a symlink pointing out of the cache) is ever written through.
    :meth:`commit` hashes what was written and moves it to its blob path; until then
    the bytes are nobody's. :meth:`close` closes the fd and removes an uncommitted file.
    """

    def __init__(self, store: BlobStore, drive: DriveInfo) -> None:
        self._store = store
        self.path, self.fd = _exclusive_temp(drive.root / "tmp")
        self.length = 0
        self.digest: str | None = None
        self.dirs: tuple[Path, ...] = ()  # after commit(): the folders to fsync
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview, at: int | None = None) -> None:
        """Write ``data`` at offset ``at`` (default: append; blocking, page-cache speed).

        Raises:
          OSError: the drive is full or failing; what was written before stays readable.
        """
        view, pos = memoryview(data), self.length if at is None else at
        while view:
            n = os.pwrite(self.fd, view, pos)
            pos, view = pos + n, view[n:]
        self.length = max(self.length, pos)

    def commit(self) -> str:
        """Hash the file, fsync it (when the store is durable) and install it as a
        blob; returns the digest (blocking: run it in a worker thread). The fd stays
        open and readable. The blob's name is durable once :attr:`dirs` are fsynced.

        Raises:
          OSError: the blob could not be installed; the temp file is left to close().
        """
        h = blake3.blake3()
        offset = 0
        while offset < self.length:
            chunk = os.pread(self.fd, min(_READ_CHUNK, self.length - offset), offset)
            if not chunk:
                raise OSError(f"block file {self.path} is shorter than what was written")
            h.update(chunk)
            offset += len(chunk)
        digest = str(h.hexdigest())
        if self._store.durable:
            os.fsync(self.fd)
        self.dirs = self._store._install(self.path, self.fd, digest, self.length)
        self.digest = digest
        if self._store.fault is not None:
            self._store.fault("renamed")
        return digest

    def close(self) -> None:
        """Close the fd; an uncommitted temp file is removed."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        if self.digest is None:
            try:
                self.path.unlink()
            except OSError:
                pass


def _real_dir(path: Path) -> None:
    """Make ``path`` a directory of its own: a symlink or file planted in its place
    (which would carry writes out of the cache) is removed first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            return
        path.unlink()  # a symlink (to anywhere) or a file: not ours to write through
    path.mkdir(exist_ok=True)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the entries renamed or created in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exclusive_temp(folder: Path) -> tuple[Path, int]:
    """A new file under a random name in ``folder``, created exclusively and never
    through a symlink; returns (path, fd open for reading and writing)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = folder / f"{secrets.token_hex(12)}.tmp"
        try:
            return path, os.open(path, flags, 0o644)
        except FileExistsError:
            continue  # planted, or (1 in 2**96) taken: another name


def _copy_fd(src: int, dst: int, length: int) -> None:
    offset = 0
    while offset < length:
        chunk = os.pread(src, min(_READ_CHUNK, length - offset), offset)
        if not chunk:
            raise OSError("block file shrank while being copied")
        os.pwrite(dst, chunk, offset)
        offset += len(chunk)
