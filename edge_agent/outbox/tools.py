"""Operator tools on an outbox file: stats and export, read-only, safe while an agent holds the file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import IO, Any

from edge_agent.outbox.file import WHEN_FULL_CODES
from edge_agent.outbox.rows import Kind, OutboxError, OutboxStats, counter_names, iso
from edge_agent.outbox.store import Outbox
from edge_agent.types import OpenAnomaly


def outbox_stats(path: str | Path) -> OutboxStats:
    """Stats of an outbox file (for `edge-agent outbox stats`) with the limits it was written under (the
    defaults for files older than that); works while the agent runs."""
    p = Path(path)
    if not p.exists():
        raise OutboxError(f"outbox {p}: no such file")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10, isolation_level=None)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {p}: {exc}") from None
    try:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        codes = {v: k for k, v in WHEN_FULL_CODES.items()}
        defaults = Outbox(p)
        box = Outbox(
            p,
            max_bytes=int(counters.get("limit.max_bytes", defaults.max_bytes)),
            max_age=int(counters["limit.max_age_ms"]) / 1000 if "limit.max_age_ms" in counters else defaults.max_age,
            when_full=codes.get(int(counters.get("limit.when_full", 0)), defaults.when_full),
        )
        box._conn = conn
        box.counters = {k: int(counters.get(k, 0)) for k in counter_names()}
        box.corrupt_files = int(counters.get("corrupt_files", 0))
        box.lost_transactions = int(counters.get("lost_transactions", 0))
        box.last_seq = int(counters.get("seq", 0))
        box.run = int(counters.get("runs", 0))
        for kind, n, size in conn.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM messages GROUP BY kind"):
            box.depth[Kind(kind)] = int(n)
            box.bytes += int(size)
        box.open_count = int(conn.execute("SELECT count(*) FROM open_anomalies").fetchone()[0])
        return box.stats()
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"outbox {p}: {exc}") from None
    finally:
        conn.close()


def read_start(path: str | Path) -> tuple[int, list[OpenAnomaly]]:
    """The last event sequence number and the anomalies left open, read without writing (for a file that
    cannot be opened for writing now, e.g. on a full disk); (0, []) when it cannot be read either."""
    p = Path(path)
    if not p.exists():
        return 0, []
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=2, isolation_level=None)
    except sqlite3.Error:
        return 0, []
    try:
        row = conn.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
        rows = conn.execute("SELECT model, anomaly_id, record FROM open_anomalies ORDER BY model").fetchall()
        return (int(row[0]) if row else 0), [OpenAnomaly(m, a, bytes(r)) for m, a, r in rows]
    except sqlite3.Error:
        return 0, []
    finally:
        conn.close()


def export(path: str | Path, out: IO[str]) -> int:
    """Write every stored message as a JSON line (publishing order) to `out`; returns how many."""
    p = Path(path)
    if not p.exists():
        raise OutboxError(f"outbox {p}: no such file")
    box = Outbox(p)
    try:
        box._conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=10, isolation_level=None)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {p}: {exc}") from None
    n = 0
    try:
        for row in box.rows():
            try:
                payload: Any = json.loads(row.payload)
            except ValueError:
                payload = row.payload.decode("utf-8", "replace")
            line = {
                "id": row.id,
                "kind": row.kind.label,
                "topic": row.topic,
                "qos": row.qos,
                "created": iso(row.created),
                "payload": payload,
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
            n += 1
    except sqlite3.DatabaseError as exc:
        raise OutboxError(f"outbox {p}: {exc}") from None
    finally:
        box._conn.close()
        box._conn = None
    return n
