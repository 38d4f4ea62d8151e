"""The outbox file's tables, their migrations, the per-row checksum and the batched statements.

Schema versions (PRAGMA user_version): 1 had no checksum; 2 adds `crc` (crc32 of topic then payload, NULL on
rows an older agent wrote: those are not checked); 3 adds `pending`, the sinks that have still to deliver the
row (a bitmask of rows.SINK_BITS; rows written before it were the JSON sink's, 1). Older files are migrated in
place when opened.
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.outbox.rows import OutboxError

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    run INTEGER NOT NULL,
    size INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    crc INTEGER,
    pending INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages(kind, id, size, created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_anomalies (
    model TEXT PRIMARY KEY,
    anomaly_id TEXT NOT NULL,
    record BLOB NOT NULL
) WITHOUT ROWID;
"""

_MIGRATIONS = {  # from version → the statement to the next
    1: "ALTER TABLE messages ADD COLUMN crc INTEGER",
    2: "ALTER TABLE messages ADD COLUMN pending INTEGER NOT NULL DEFAULT 1",
}

SET_COUNTER = "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"

# Many rows per statement: sqlite3 releases the GIL around every step, and with a busy event loop each
# re-acquisition can wait a whole switch interval (5 ms), so one step per row starves this thread.
_ROWS_PER_INSERT = 128
_IDS_PER_DELETE = 512
_INSERT = "INSERT INTO messages(kind, qos, created, run, size, topic, payload, crc, pending) VALUES "
_PLACES = "(?, ?, ?, ?, ?, ?, ?, ?, {pending:d})"


def connect(path: Path) -> sqlite3.Connection:
    """Open the file in WAL mode, check it (DatabaseError: damaged) and bring its tables up to date.

    OutboxError: the file is fine but cannot be used now (WAL mode refused, e.g. on a full disk).
    """
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"outbox {path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-2048")  # 2 MiB of page cache, whatever the backlog: memory stays flat
        conn.execute("PRAGMA journal_size_limit=8388608")  # the WAL shrinks back after checkpoints
        check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        prepare(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(conn: sqlite3.Connection) -> None:
    """Create the tables of a new file, or migrate an older one (DatabaseError: written by a newer agent)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"written by a newer edge-agent (schema {version})")
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            if "crc" not in columns:
                conn.execute(_MIGRATIONS[1])  # tables made by an agent that did not number its schema
            if "pending" not in columns:
                conn.execute(_MIGRATIONS[2])
        else:
            while version < SCHEMA_VERSION:
                conn.execute(_MIGRATIONS[version])
                version += 1
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], pending: int = 1) -> None:
    """Insert (kind, qos, created, run, size, topic, payload, crc) rows for the sinks in `pending`, many per
    statement."""
    places = _PLACES.format(pending=int(pending))
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        conn.execute(_INSERT + ",".join([places] * len(chunk)), [v for row in chunk for v in row])


def retarget(conn: sqlite3.Connection, targets: int) -> int:
    """Rows only for sinks no longer configured go to the configured ones (`targets`); returns how many changed.

    A row never waits for a sink that will not come: switching payloads sends the backlog through the new sink.
    """
    cur = conn.execute(
        "UPDATE messages SET pending = CASE WHEN pending & ?1 = 0 THEN ?1 ELSE pending & ?1 END "
        "WHERE pending & ?1 != pending OR pending & ?1 = 0",
        (int(targets),),
    )
    return int(cur.rowcount)


def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete rows by id, many per statement."""
    for i in range(0, len(ids), _IDS_PER_DELETE):
        chunk = ids[i : i + _IDS_PER_DELETE]
        conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)


class Checksums:
    """crc32 of a row's topic (its UTF-8 bytes) followed by its payload; topics' own crc32 cached."""

    LIMIT = 4096  # topics remembered (a damaged file could show many made-up ones)

    def __init__(self) -> None:
        self._topics: dict[bytes, tuple[int, str | None]] = {}
        self._texts: dict[str, int] = {}

    def of(self, topic: str, payload: bytes) -> int:
        """The checksum to store with a new row."""
        start = self._texts.get(topic)
        if start is None:
            if len(self._texts) >= self.LIMIT:
                self._texts.clear()
            start = self._texts[topic] = zlib.crc32(topic.encode())
        return zlib.crc32(payload, start)

    def check(self, topic: object, payload: object, crc: object) -> str | None:
        """The topic as text when the stored row is intact (crc None: an old row, not checked), else None."""
        if type(topic) is not bytes or type(payload) is not bytes:  # a damaged record can change a column's type
            return None
        hit = self._topics.get(topic)
        if hit is None:
            try:
                text: str | None = topic.decode()
            except UnicodeDecodeError:
                text = None
            if len(self._topics) >= self.LIMIT:
                self._topics.clear()
            hit = self._topics[topic] = (zlib.crc32(topic), text)
        if crc is not None and zlib.crc32(payload, hit[0]) != crc:
            return None
        return hit[1]
