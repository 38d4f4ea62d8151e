"""A damaged outbox file: moved aside, what SQLite can still read copied into a new one, the loss counted.

The damaged file is renamed `<name>.corrupt-<UTC>` (its WAL `…-wal` beside it; the old `-shm`, an index SQLite
rebuilds from the WAL, is deleted so it cannot point past the damage). It is then opened read-only (files left
as they were): every row that still reads and passes its checksum goes into the new file with its kind, time
and run, and so do the drop counters, the sequence number and the open anomalies. What was lost:
- transactions: commit frames after the first damaged WAL frame (walcheck);
- rows: the file keeps its row count per kind with every transaction (`rows.<kind>`); the latest count that
  can be read (from the WAL's intact frames after the damage, or from the file itself) minus the rows
  recovered. It is a lower bound when acknowledgements were among the lost transactions, and unknown when
  no count can be read. Lost rows are counted as drops (reason `corrupt`), and so are rows that read but
  fail their checksum; transactions go to `lost_transactions`.
One ERROR line says all of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.outbox import walcheck
from edge_agent.outbox.rows import Kind, OutboxError
from edge_agent.outbox.schema import Checksums
from edge_agent.outbox.walcheck import Damage

log = logging.getLogger("edge_agent.outbox")

_READ_BATCH = 512
_COLUMNS = "id, kind, qos, created, run, size, CAST(topic AS BLOB), payload, crc"


@dataclass
class Salvage:
    """What could be read from a damaged file."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)  # (kind, qos, created, run, size, topic, payload, crc)
    counters: dict[str, int] = field(default_factory=dict)
    open_anomalies: list[tuple[str, str, bytes]] = field(default_factory=list)
    invalid: dict[Kind, int] = field(default_factory=dict)  # rows read that failed their checksum
    expected: dict[Kind, int] | None = None  # rows per kind at the last transaction that can be read
    lost_transactions: int = 0
    lost_frames: int = 0

    def recovered(self) -> dict[Kind, int]:
        """Rows recovered per kind."""
        out = dict.fromkeys(Kind, 0)
        for row in self.rows:
            out[Kind(row[0])] += 1
        return out

    def lost_rows(self) -> dict[Kind, int] | None:
        """Rows lost per kind beyond those that failed their checksum (None: cannot be counted)."""
        if self.expected is None:
            return None
        got = self.recovered()
        return {k: max(0, self.expected.get(k, 0) - got[k] - self.invalid.get(k, 0)) for k in Kind}


def move_aside(path: Path) -> Path:
    """Rename the file and its WAL to `<name>.corrupt-<UTC>`; drop its -shm. Returns the new name."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        if path.exists() or path.is_symlink():
            os.replace(path, target)
        else:
            target.touch()  # a WAL without its main file: keep the pair's names
    except OSError as exc:
        raise OutboxError(f"outbox {path} is unusable and cannot be moved aside: {exc.strerror}") from None
    wal = path.with_name(path.name + "-wal")
    if wal.exists():  # a stale WAL must not be replayed into the new file
        with contextlib.suppress(OSError):
            os.replace(wal, target.with_name(target.name + "-wal"))
    with contextlib.suppress(OSError):
        path.with_name(path.name + "-shm").unlink()
    return target


def salvage(moved: Path, damage: Damage) -> Salvage:
    """Read what can be read from a moved-aside file (left as it is)."""
    out = Salvage()
    wal = damage.wal
    if wal is not None:
        out.lost_transactions, out.lost_frames = wal.lost_commits, wal.lost_frames
    source, scratch = moved, []
    if damage.main_lost:
        # SQLite ignores a WAL beside an empty main file: give it one, page 1 as the WAL last wrote it
        if wal is None or 1 not in wal.pages:
            return out
        source = moved.with_name(moved.name + ".recover")
        scratch = [source, source.with_name(source.name + "-wal"), source.with_name(source.name + "-shm")]
        try:
            source.write_bytes(walcheck.frame_page(moved.with_name(moved.name + "-wal"), wal, wal.pages[1]))
            shutil.copyfile(moved.with_name(moved.name + "-wal"), scratch[1])
        except OSError as exc:
            log.debug("outbox: cannot make a copy to recover from (%s)", exc)
            _remove(scratch)
            return out
    try:
        conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=2, isolation_level=None)
    except sqlite3.Error:
        _remove(scratch)
        return out
    try:
        _read(conn, out)
        if wal is not None and wal.lost_commits:
            _lost_counters(conn, moved, wal, out)
    finally:
        conn.close()
        _remove(scratch or [moved.with_name(moved.name + "-shm")])
    return out


def _read(conn: sqlite3.Connection, out: Salvage) -> None:
    checks = Checksums()
    for row in _rows(conn):
        _, kind, qos, created, run, size, topic, payload, crc = row
        if kind not in (0, 1, 2):
            continue  # not even its kind is readable
        if crc is None and type(topic) is bytes and type(payload) is bytes:
            crc = checks.of(topic.decode("utf-8", "replace"), payload)  # an old row: its bytes as they are
        text = checks.check(topic, payload, crc)
        if text is None:
            out.invalid[Kind(kind)] = out.invalid.get(Kind(kind), 0) + 1
            continue
        out.rows.append((kind, qos, created, run, size, text, payload, crc))
    with contextlib.suppress(sqlite3.Error):
        out.counters = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
        if all(f"rows.{k.label}" in out.counters for k in Kind):
            out.expected = {k: out.counters[f"rows.{k.label}"] for k in Kind}
    with contextlib.suppress(sqlite3.Error):
        out.open_anomalies = [(m, a, bytes(r)) for m, a, r in conn.execute("SELECT * FROM open_anomalies")]


def _rows(conn: sqlite3.Connection) -> Iterator[tuple[Any, ...]]:
    """Every row that reads, in id order; a damaged part of the table is stepped over (bounded)."""
    after, step = 0, 0
    for _ in range(1_000_000):
        try:
            got = 0
            for row in conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after, _READ_BATCH)
            ):
                got += 1
                after = row[0]
                yield row
            if got < _READ_BATCH:
                return
            step = 0
        except sqlite3.DatabaseError:
            step = 1 if step == 0 else step * 2  # past the damaged page: 1, 2, 4, … ids further
            if after + step > 2**62:
                return
            after += step


def _lost_counters(conn: sqlite3.Connection, moved: Path, wal: walcheck.Wal, out: Salvage) -> None:
    """The row counts of the last committed transaction, from the intact frames after the damage."""
    try:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'counters'").fetchone()
    except sqlite3.Error:
        return
    if root is None or root[0] not in wal.lost_pages:
        return
    page = walcheck.frame_page(moved.with_name(moved.name + "-wal"), wal, wal.lost_pages[root[0]])
    counts = {}
    for record in walcheck.index_leaf_records(page, root[0]):
        if len(record) == 2 and isinstance(record[0], bytes) and isinstance(record[1], int):
            counts[record[0].decode("utf-8", "replace")] = record[1]
    if all(f"rows.{k.label}" in counts for k in Kind):
        out.expected = {k: counts[f"rows.{k.label}"] for k in Kind}
        out.counters.update((k, v) for k, v in counts.items() if k.split(".")[0] in ("seq", "runs"))


def _remove(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def report(path: Path, moved: Path, damage: Damage, found: Salvage, copied: bool) -> None:
    """The one ERROR line."""
    got = sum(found.recovered().values())
    lost = found.lost_rows()
    invalid = sum(found.invalid.values())
    parts = []
    if found.lost_transactions:
        parts.append(f"{found.lost_transactions} committed transactions ({found.lost_frames} WAL frames)")
    if damage.main_lost:
        parts.append("every page only the main file held")
    if lost is None:
        parts.append("rows: cannot be counted")
    else:
        at_least = "at least " if found.lost_transactions else ""
        parts.append(f"{at_least}{sum(lost.values())} rows")
    if invalid:
        parts.append(f"{invalid} rows that failed their checksum")
    where = "into a new outbox" if copied else "but could not copy them (they stay in the moved file)"
    log.error(
        "outbox %s is damaged (%s); moved it to %s; recovered %d rows %s; lost: %s",
        path,
        damage.reason,
        moved,
        got if copied else 0,
        where,
        ", ".join(parts),
    )
