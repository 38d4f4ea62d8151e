"""Damage SQLite would not report, found before it opens the file: a lost main file, a WAL with a bad frame.

SQLite reads a WAL up to its first frame that fails its salt or checksum and silently ignores the rest
(https://www.sqlite.org/fileformat2.html#the_write_ahead_log): committed transactions after a damaged frame
vanish without a word, and a main file truncated to 0 bytes makes it start an empty database and overwrite
the WAL. Both are checked here first:

- the WAL: 32-byte header (magic 0x377f0682/3: checksums over little/big-endian words; page size; salts;
  header checksum), frames of a 24-byte header (page number, database size for commit frames, salts,
  cumulative checksum) and a page. A commit frame carrying the current salts after the first bad frame is
  a committed transaction SQLite will drop: damage. Frames with other salts are an older WAL's leftovers.
- the main file: empty, or without the SQLite header, while the WAL holds committed transactions: damage.

The checksum is two running sums over 32-bit word pairs, s0 += x0 + s1, s1 += x1 + s0: linear in (s0, s1),
so each frame's sum is M^n·(previous sum) + Σ M^(n-k)·u_k with M = [[1, 1], [1, 2]]; numpy computes every
frame's part at once, and each frame is checked against the stored sum of the one before it, so frames after
a damaged one can still be verified (and their pages read, e.g. the counters of the last transaction).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

WAL_MAGIC = (0x377F0682, 0x377F0683)  # low bit: checksums over big-endian words
SQLITE_HEADER = b"SQLite format 3\x00"
WAL_HEADER, FRAME_HEADER = 32, 24
_MASK = 0xFFFFFFFF
_BLOCK = 256  # frames checksummed per numpy pass (bounds memory: ~256 × page size × 24 bytes)


@dataclass
class Wal:
    """What a WAL file holds, as SQLite will read it and beyond."""

    page_size: int = 0
    frames: int = 0  # complete frames in the file
    valid: int = 0  # frames SQLite will use: up to the last commit frame before the first bad frame
    commits: int = 0  # committed transactions among those
    first_bad: int | None = None  # the first frame failing its salt or checksum
    lost_commits: int = 0  # committed transactions SQLite drops: commit frames with the current salts from the
    # valid end on, when one of them lies after the first bad frame (else the bad frame is a torn last write)
    lost_frames: int = 0  # frames with the current salts from the first bad one on
    bad_frames: int = 0  # of those, how many fail their own checksum
    header_ok: bool = True
    pages: dict[int, int] = field(default_factory=dict)  # page number → newest intact frame within `valid`
    lost_pages: dict[int, int] = field(default_factory=dict)  # page number → newest intact lost committed frame


@dataclass(frozen=True)
class Damage:
    """Why a file is damaged, and what the WAL says was lost."""

    reason: str
    wal: Wal | None = None
    main_lost: bool = False  # the main file is empty or not a database: only the WAL's pages are left


def _checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), plain Python: for the 24-byte header."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def _matrix_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """M^(n-1-k) for k in 0..n-1 (shape n×2×2) and M^n, mod 2^32, as uint64."""
    import numpy as np

    powers = np.empty((n + 1, 2, 2), dtype=np.uint64)
    p: Any = np.eye(2, dtype=np.uint64)
    m = np.array([[1, 1], [1, 2]], dtype=np.uint64)
    for j in range(n + 1):
        powers[j] = p
        p = (m @ p) & _MASK
    return powers[n - 1 :: -1][:n], powers[n]


def read_wal(path: Path) -> Wal | None:
    """Parse and verify a WAL file; None when there is none (or it is too short to hold a frame)."""
    import numpy as np

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < WAL_HEADER:
        return None
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:WAL_HEADER])
    if magic not in WAL_MAGIC or page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return None  # not a WAL SQLite would read: nothing in it counts
    big = bool(magic & 1)
    wal = Wal(page_size=page_size, frames=(len(data) - WAL_HEADER) // (FRAME_HEADER + page_size))
    wal.header_ok = _checksum(data[:24], big) == (c0, c1)
    if wal.frames == 0:
        return wal
    size = FRAME_HEADER + page_size
    raw = np.frombuffer(data, dtype=np.uint8, count=wal.frames * size, offset=WAL_HEADER).reshape(wal.frames, size)
    head = raw[:, :FRAME_HEADER].copy().view(">u4").astype(np.uint64)  # page, db size, salt1, salt2, c0, c1
    salted = (head[:, 2] == salt1) & (head[:, 3] == salt2)
    stored = head[:, 4:6]
    prev = np.vstack([np.array([[c0, c1]], dtype=np.uint64), stored[:-1]])
    pairs = (8 + page_size) // 8
    coef, mn = _matrix_powers(pairs)
    ok = np.zeros(wal.frames, dtype=bool)
    words = ">u4" if big else "<u4"
    for start in range(0, wal.frames, _BLOCK):
        block = raw[start : start + _BLOCK]
        content = np.concatenate([block[:, :8], block[:, FRAME_HEADER:]], axis=1)
        x = content.view(words).astype(np.uint64).reshape(len(block), pairs, 2)
        u0, u1 = x[..., 0], x[..., 0] + x[..., 1]
        part0 = (coef[:, 0, 0] * u0 + coef[:, 0, 1] * u1).sum(axis=1)
        part1 = (coef[:, 1, 0] * u0 + coef[:, 1, 1] * u1).sum(axis=1)
        p = prev[start : start + _BLOCK]
        e0 = (mn[0, 0] * p[:, 0] + mn[0, 1] * p[:, 1] + part0) & _MASK
        e1 = (mn[1, 0] * p[:, 0] + mn[1, 1] * p[:, 1] + part1) & _MASK
        ok[start : start + _BLOCK] = (e0 == stored[start : start + _BLOCK, 0]) & (
            e1 == stored[start : start + _BLOCK, 1]
        )
    good = salted & ok & wal.header_ok
    commit = head[:, 1] != 0
    bad = np.flatnonzero(~good)
    wal.first_bad = int(bad[0]) if len(bad) else None
    end = wal.frames if wal.first_bad is None else wal.first_bad
    commits = np.flatnonzero(commit[:end])
    wal.valid = int(commits[-1]) + 1 if len(commits) else 0
    wal.commits = len(commits)
    for i in range(wal.valid):
        wal.pages[int(head[i, 0])] = i
    if wal.first_bad is not None:
        tail = np.arange(wal.frames) >= wal.valid
        lost = tail & salted
        wal.lost_frames = int(lost.sum())
        wal.bad_frames = int((lost & ~ok).sum())
        lost_commits = np.flatnonzero(lost & commit)
        # a torn last write (power cut) leaves a bad frame with nothing committed after it: not damage
        wal.lost_commits = len(lost_commits) if len(lost_commits) and lost_commits[-1] > wal.first_bad else 0
        last = int(lost_commits[-1]) if len(lost_commits) else -1
        for f in np.flatnonzero(lost & ok):
            if f <= last:
                wal.lost_pages[int(head[f, 0])] = int(f)
    return wal


def frame_page(path: Path, wal: Wal, frame: int) -> bytes:
    """The page stored in one frame of the WAL at `path`."""
    offset = WAL_HEADER + frame * (FRAME_HEADER + wal.page_size) + FRAME_HEADER
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(wal.page_size)


def inspect(path: Path) -> Damage | None:
    """Damage SQLite would not report (see the module's doc), or None."""
    wal_path = path.with_name(path.name + "-wal")
    wal = read_wal(wal_path) if wal_path.exists() else None
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        head = b""
    except OSError:
        return None  # a directory, unreadable: SQLite fails to open it and says so
    if head != SQLITE_HEADER:
        if wal is not None and wal.commits:
            what = "empty" if not head else "not an SQLite database"
            return Damage(f"main file {what} beside a WAL of {wal.commits} committed transactions", wal, main_lost=True)
        return None
    if wal is not None and wal.lost_commits:
        header = "" if wal.header_ok else "WAL header fails its checksum; "
        return Damage(
            f"{header}WAL frame {wal.first_bad} of {wal.frames} fails its checksum and {wal.lost_commits} committed "
            "transactions follow it",
            wal,
        )
    return None


# ------------------------------------------------------------ b-tree pages (for what the lost frames held)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    v = 0
    for k in range(9):
        b = buf[i + k]
        if k == 8:
            return (v << 8) | b, i + 9
        v = (v << 7) | (b & 0x7F)
        if b < 0x80:
            return v, i + k + 1
    raise IndexError  # pragma: no cover


def _value(serial: int, body: bytes, i: int) -> tuple[Any, int]:
    sizes = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 7: 8, 8: 0, 9: 0}
    if serial in (8, 9):
        return serial - 8, i
    if serial in sizes:
        n = sizes[serial]
        return (int.from_bytes(body[i : i + n], "big", signed=True) if n and serial != 7 else None), i + n
    n = (serial - 12) // 2 if serial % 2 == 0 else (serial - 13) // 2
    return body[i : i + n], i + n


def index_leaf_records(page: bytes, page_number: int) -> list[list[Any]]:
    """The records of an index leaf page (a WITHOUT ROWID table that fits in one page, like `counters`);
    [] for any other page or a malformed one."""
    base = 100 if page_number == 1 else 0
    try:
        if page[base] != 0x0A:
            return []
        cells = int.from_bytes(page[base + 3 : base + 5], "big")
        out = []
        for c in range(cells):
            ptr = int.from_bytes(page[base + 8 + 2 * c : base + 10 + 2 * c], "big")
            _, i = _varint(page, ptr)  # payload size
            header_size, j = _varint(page, i)
            serials = []
            while j < i + header_size:
                serial, j = _varint(page, j)
                serials.append(serial)
            k, values = i + header_size, []
            for serial in serials:
                value, k = _value(serial, page, k)
                values.append(value)
            out.append(values)
        return out
    except (IndexError, ValueError):
        return []
