"""The disk under the outbox: how full it is, a reserve that makes room to delete, and what a failure means.

SQLite needs free space to delete rows (the WAL grows before the file shrinks) and to checkpoint (pages the
WAL holds move into the main file). On a full disk, nothing could then be deleted and no space was ever freed.
So a reserve file (`<name>.reserve`, 1/16 of the filesystem, 64 KiB to 1 MiB) is written next to the outbox:
when a delete or a checkpoint fails for lack of space, it is removed to make room, and written again once the
disk has room for it twice over. While free space is low, the WAL is checkpointed after a few pages instead of
SQLite's 1,000 (4 MB), so the pages it holds never outgrow what the reserve can take in.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from pathlib import Path
from typing import IO

from edge_agent.outbox.rows import OutboxBusy, OutboxError

log = logging.getLogger("edge_agent.outbox")

RESERVE_MIN = 64 * 1024
RESERVE_MAX = 1024 * 1024
LOW_SPACE = 16 * 1024 * 1024  # free bytes below which the WAL is kept small
DEFAULT_CHECKPOINT = 1000  # SQLite's wal_autocheckpoint, in pages

_ENVIRONMENT = {
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_NOLFS,
}


def is_full(exc: BaseException) -> bool:
    """The disk (or the file's size limit) is full."""
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT


def is_environment(exc: sqlite3.Error) -> bool:
    """The file is fine but the system is not (disk full, I/O error, read-only): retry, do not move it aside."""
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in _ENVIRONMENT


def describe(exc: BaseException) -> str:
    """A short cause for logs and the status payload."""
    if is_full(exc):
        return "disk full"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if isinstance(exc, OutboxError) and text.startswith("outbox "):
        text = text.split(": ", 1)[-1]  # the path is in the log line already
    return text


class Disk:
    """The filesystem of one outbox file and the reserve file beside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lockfile: IO[bytes] | None = None
        self.reserve_path = path.with_name(path.name + ".reserve")
        self.reserve_size = 0
        self.released = False  # the reserve was used up (disk full)
        self.missing = False  # the reserve is not in place: written again once there is room

    def lock(self) -> None:
        """Hold `<name>.lock` (flock) while open: one agent per outbox, a second publisher would send every row
        twice. OutboxBusy: someone holds it; OutboxError: it cannot be created."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            f = open(lock_path, "ab")  # noqa: SIM115 (held open for the outbox's lifetime)
        except OSError as exc:
            raise OutboxError(f"outbox {self.path}: cannot create {lock_path.name}: {describe(exc)}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise OutboxBusy(f"outbox {self.path} is in use by another process (an agent or a drain)") from None
        self._lockfile = f

    def unlock(self) -> None:
        """Let go of the lock (closing the file drops the flock)."""
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def _statvfs(self) -> os.statvfs_result | None:
        try:
            return os.statvfs(self.path.parent)
        except OSError:
            return None

    def free(self) -> int | None:
        """Bytes free for us (None: unknown)."""
        st = self._statvfs()
        return None if st is None else st.f_bavail * st.f_frsize

    def size(self) -> int:
        """The reserve's size for this filesystem."""
        st = self._statvfs()
        total = RESERVE_MAX * 16 if st is None else st.f_blocks * st.f_frsize
        return max(RESERVE_MIN, min(RESERVE_MAX, total // 16)) // 4096 * 4096

    @property
    def has_reserve(self) -> bool:
        """The reserve file is in place."""
        return self.reserve_path.exists()

    def ensure_reserve(self, *, margin: int = 0) -> bool:
        """Write the reserve if it is missing and the disk has room for it (and `margin` more); True if in place."""
        self.reserve_size = self.size()
        try:
            have = self.reserve_path.stat().st_size
        except OSError:
            have = -1
        if have >= self.reserve_size:
            self.missing = self.released = False
            return True
        self.missing = True
        free = self.free()
        if free is None or free < self.reserve_size - max(have, 0) + margin:
            return False
        try:
            with open(self.reserve_path, "ab") as f:
                f.write(b"\0" * (self.reserve_size - max(have, 0)))  # real blocks: fallocate is not everywhere
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            return False
        if self.released:
            log.info(
                "outbox %s: the disk has room again; its %d KiB reserve is back", self.path, self.reserve_size >> 10
            )
        self.missing = self.released = False
        return True

    def release_reserve(self) -> bool:
        """Delete the reserve to make room (True if it freed anything)."""
        try:
            size = self.reserve_path.stat().st_size
            self.reserve_path.unlink()
        except OSError:
            return False
        self.released = self.missing = True
        log.warning("outbox %s: disk full; gave up its %d KiB reserve to make room for SQLite", self.path, size >> 10)
        return True

    def checkpoint_pages(self, page_size: int) -> int:
        """The wal_autocheckpoint to use now: SQLite's default, or half the reserve in pages while space is low."""
        free = self.free()
        if free is None or free >= LOW_SPACE:
            return DEFAULT_CHECKPOINT
        return max(8, (self.reserve_size or self.size()) // 2 // page_size)
