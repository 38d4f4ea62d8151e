"""The outbox file's tables and the batched statements."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.outbox.rows import OutboxError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    run INTEGER NOT NULL,
    size INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_kind ON messages(kind, id, size, created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS open_anomalies (
    model TEXT PRIMARY KEY,
    anomaly_id TEXT NOT NULL,
    record BLOB NOT NULL
) WITHOUT ROWID;
"""

SET_COUNTER = "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"

# Many rows per statement: sqlite3 releases the GIL around every step, and with a busy event loop each
# re-acquisition can wait a whole switch interval (5 ms), so one step per row starves this thread.
_ROWS_PER_INSERT = 128
_IDS_PER_DELETE = 512
_INSERT = "INSERT INTO messages(kind, qos, created, run, size, topic, payload) VALUES "
_PLACES = "(?, ?, ?, ?, ?, ?, ?)"


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
    """Create the tables of a new file (DatabaseError: written by a newer agent)."""
    conn.executescript(SCHEMA)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    elif version != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"written by a newer edge-agent (schema {version})")


def insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert (kind, qos, created, run, size, topic, payload) rows, many per statement."""
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        conn.execute(_INSERT + ",".join([_PLACES] * len(chunk)), [v for row in chunk for v in row])


def delete(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    """Delete rows by id, many per statement."""
    for i in range(0, len(ids), _IDS_PER_DELETE):
        chunk = ids[i : i + _IDS_PER_DELETE]
        conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
