"""Cross-process fill claims: the block file as the meeting point of several workers.

The store primitive of the cross-process single-flight of ``--workers N`` (issue 17
item 1): :mod:`mcc.engine.claimed` builds the engine's fills on it.

Theory of operation: the fill of one block (one key, version and block index) has one
fixed file name, ``<drive>/fills/<name>.part``. Whoever opens it and takes
``flock(LOCK_EX | LOCK_NB)`` on it is the **filler**; everybody else who opens it is a
**follower** and reads the same inode as it grows. The lock belongs to the open file,
so the kernel drops it however the filler ends (kill -9 included).

The filler changes the file's state only while it holds the lock, and marks the inode
itself, so a follower keeps the truth even after the name is gone:

- bytes arrive with ``pwrite``; the file's size is what may be read;
- the whole block written, the filler sets the mode to ``0o444`` (:data:`DONE_MODE`),
  then hashes it and installs a second name of the inode (a hard link) in the blob
  store; the fill's own name stays, and the lock held, until the filler closes the
  writer, which it does once the block's index row is written: a claimant arriving
  in between follows a done fill instead of fetching the block again, and one
  arriving later finds the row (a follower holding the fd serves the complete block
  either way);
- a filler that gives up (upstream error) unlinks the name with the mode unchanged;
- a filler that dies leaves the name on the inode and the lock free.

After taking the lock, the claimant checks that the name still points at the inode it
locked: a filler may have renamed or unlinked it between our ``open`` and our ``flock``
(locking that inode would be locking a blob). A name still there with bytes in it and
the lock free is an orphan: the claimant takes over and starts again from byte 0 (the
dead filler's last write may be torn; starting over serves no wrong byte).

A follower's probe of the lock (:meth:`Claim.state`) holds a shared lock for an
instant: a claimant arriving then becomes a follower of nobody, sees the fill orphaned
at its next look and claims again. Followers poll; claims never wait on a lock.

What a follower sees is classified by :func:`follow_state` from plain facts (mode,
link count, whether the name is still ours, whether the lock is free): a table, no I/O.
"""

from __future__ import annotations

import enum
import fcntl
import os
import stat
from pathlib import Path

from .blobs import BlobStore, BlockWriter, DriveInfo, _real_dir

__all__ = [
    "DONE_MODE",
    "FILLS_DIR",
    "Claim",
    "ClaimedWriter",
    "Follow",
    "Role",
    "claim",
    "follow_state",
    "sweep_fills",
]

FILLS_DIR = "fills"
DONE_MODE = 0o444  # the mark of a complete block file (set by its filler under lock)
_FILL_MODE = 0o644
# a claim retries when the name moved under it (a filler committed or gave up between
# our open and our flock); each retry means someone else made progress, so a few suffice
_MAX_CLAIM_TRIES = 8


class Role(enum.Enum):
    FILL = "fill"  # we hold the lock: fetch and write the block
    FOLLOW = "follow"  # another live process fills: read the file as it grows


class Follow(enum.Enum):
    GROWING = "growing"  # the filler is alive: bytes below the size may be read
    DONE = "done"  # complete: the whole block is in the file
    ABANDONED = "abandoned"  # the filler gave up: claim again (or fail the readers)
    ORPHANED = "orphaned"  # the filler died mid-fill: claim again and take over


# (done mark set, name gone, lock free) -> state; the done mark wins over everything
_FOLLOW_TABLE: dict[tuple[bool, bool, bool], Follow] = {
    (True, False, False): Follow.DONE,
    (True, False, True): Follow.DONE,
    (True, True, False): Follow.DONE,
    (True, True, True): Follow.DONE,
    (False, False, False): Follow.GROWING,
    (False, True, False): Follow.ABANDONED,  # unlinked under lock, lock not yet closed
    (False, True, True): Follow.ABANDONED,
    (False, False, True): Follow.ORPHANED,
}


def follow_state(*, done: bool, name_gone: bool, lock_free: bool) -> Follow:
    """What a follower should do, from the facts about the inode it holds.

    Args:
      done: the inode carries :data:`DONE_MODE`.
      name_gone: the fill's name no longer points at this inode (renamed or unlinked).
      lock_free: nobody holds the fill lock on this inode.
    """
    return _FOLLOW_TABLE[(done, name_gone, lock_free)]


class Claim:
    """One process's hold on one block fill, as filler or follower.

    Attributes:
      path: the fill's name.
      fd: open for reading (and writing, for the filler) on the claimed inode.
      role: :attr:`Role.FILL` or :attr:`Role.FOLLOW`.
      took_over: the filler found an orphan (a dead filler's bytes) and emptied it.
    """

    def __init__(self, path: Path, fd: int, role: Role, took_over: bool) -> None:
        self.path = path
        self.fd = fd
        self.role = role
        self.took_over = took_over
        self._closed = False

    def size(self) -> int:
        """Bytes in the file now (a follower may read below this)."""
        return os.fstat(self.fd).st_size

    def state(self) -> Follow:
        """Where the fill stands, seen from this fd (for a follower; non-blocking).

        Raises:
          OSError: the fd cannot be inspected.
        """
        st = os.fstat(self.fd)
        done = stat.S_IMODE(st.st_mode) == DONE_MODE
        return follow_state(
            done=done, name_gone=not _names(self.path, st), lock_free=_lock_free(self.path, st)
        )

    def filler_alive(self) -> bool:
        """True while the filler holds the fill's lock on the inode we hold."""
        return not _lock_free(self.path, os.fstat(self.fd))

    def close(self) -> None:
        """Close the fd (a filler's lock goes with it)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def claim(drive_root: Path, name: str) -> Claim:
    """Claim the fill ``name`` (a safe file name, such as a hex digest of the block's
    key) on the drive at ``drive_root``: the first caller becomes its filler, later
    ones its followers, and a caller finding a dead filler's file takes it over.

    Raises:
      ValueError: ``name`` is not a plain file name.
      OSError: the file cannot be created or locked (ENOSPC, a read-only drive), or
        the name kept moving under us.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"fill name must be a plain file name, got {name!r}")
    folder = drive_root / FILLS_DIR
    _real_dir(folder)
    path = folder / f"{name}.part"
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    took_over = False
    for _ in range(_MAX_CLAIM_TRIES):
        fd = os.open(path, flags, _FILL_MODE)
        keep = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                keep = True
                return Claim(path, fd, Role.FOLLOW, False)
            st = os.fstat(fd)
            if not _names(path, st):
                continue  # renamed into the store or given up before our lock
            if st.st_size > 0 or stat.S_IMODE(st.st_mode) == DONE_MODE:
                # an orphan: unlink it (its followers see it abandoned and claim
                # again; a done one they may still serve) and start on a new inode
                os.unlink(path)
                took_over = True
                continue
            os.fchmod(fd, _FILL_MODE)  # whatever the umask made of it: not "done"
            keep = True
            return Claim(path, fd, Role.FILL, took_over)
        finally:
            if not keep:
                os.close(fd)
    raise OSError(f"fill {path} kept moving while being claimed")


class ClaimedWriter(BlockWriter):
    """A :class:`BlockWriter` on a claimed fill's file: it writes, marks the block
    done for followers, then commits into the store like any block; :meth:`close`
    removes the fill's name (done or given up) and lets the claim go.

    Args:
      store: the blob store to commit into.
      held: a claim with :attr:`Role.FILL` (the writer takes over its fd).
      previous: a writer whose file readers may still use; closed with this one
        (a fill taken over from a dead filler: its old inode).

    Raises:
      ValueError: the claim is a follower's.
    """

    def __init__(self, store: BlobStore, held: Claim, previous: BlockWriter | None = None) -> None:
        if held.role is not Role.FILL:
            raise ValueError("only the filler of a claim may write it")
        self._store = store
        self.path, self.fd = held.path, held.fd
        held._closed = True  # the fd is ours now
        self.length = 0
        self.digest = None
        self.dirs = ()
        self._closed = False
        self._previous = previous

    def commit(self) -> str:
        """Mark the block done (followers may serve all of it), then hash, fsync and
        install a hard link of it as :meth:`BlockWriter.commit` does (the fill's
        name stays until :meth:`close`).

        Raises:
          OSError: as :meth:`BlockWriter.commit`.
        """
        os.fchmod(self.fd, DONE_MODE)
        fill = self.path
        link = fill.parent.parent / "tmp" / f"{fill.stem}.{os.getpid()}.{id(self):x}.link"
        os.link(fill, link)
        self.path = link
        try:
            return super().commit()
        finally:
            self.path = fill
            if self.digest is None:  # not installed: the link is ours to remove
                _unlink(link)

    def close(self) -> None:
        """Remove the fill's name (still ours: we hold its lock), close the fd (the
        lock goes with it) and the previous writer."""
        if self._closed:
            return
        self._closed = True
        try:
            _unlink(self.path)
        finally:
            os.close(self.fd)
            if self._previous is not None:
                self._previous.close()


def sweep_fills(drives: list[DriveInfo]) -> int:
    """Remove fill files left by a crash; only while no worker runs (the master holds
    the drive locks). Returns how many."""
    removed = 0
    for d in drives:
        folder = d.root / FILLS_DIR
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _names(path: Path, st: os.stat_result) -> bool:
    """Does ``path`` still name the inode described by ``st``?"""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _lock_free(path: Path, st: os.stat_result) -> bool:
    """Is the fill lock on this inode free? Tested with a second open of the name
    (a name already gone means the filler finished with it under lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    finally:
        os.close(fd)
