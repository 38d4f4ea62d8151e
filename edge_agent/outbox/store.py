"""Durable queue of messages not yet acknowledged by the broker: SQLite in WAL mode, standard library only.

Every message is written here before it is published and deleted only after the broker acknowledged it,
so a crash (kill -9), a reboot or a long outage loses nothing that was committed. The class is synchronous
and blocking: the publisher calls it from one worker thread, never from the event loop.

Rules the rest of the agent relies on:
- `take` hands out events before scores before telemetry, and each kind in insertion order, so the order
  per topic is kept and a telemetry backlog never delays an anomaly event.
- Bounds: `max_bytes` (payload + topic + ROW_OVERHEAD per row) and `max_age`. To make room, lower kinds
  give way first (telemetry, then scores); within the new message's own kind, `drop_oldest` evicts the
  oldest stored rows and `drop_newest` refuses the new one. A message never evicts a higher kind.
  Every drop is counted by reason and kind, in the file itself.
- Durability: every `put` is one transaction whose commit fsyncs the WAL (synchronous=FULL); how often
  the publisher commits is `outbox.sync` (full: as soon as messages arrive, batched: every
  commit_interval). Deletes after acks are not fsynced: a crash then costs a duplicate, never a loss.
- A file that is not a database, fails the integrity check or cannot be opened is moved aside as
  `<name>.corrupt-<UTC timestamp>` with an error log, and a new outbox is created. One process at a
  time: `<name>.lock` is flocked while open (stats and export read without it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from edge_agent.config import OutboxSection, WhenFull
from edge_agent.outbox.rows import Entry, Kind, OutboxError, OutboxStats, Row, counter_names
from edge_agent.types import OpenAnomaly

log = logging.getLogger("edge_agent.outbox")

SCHEMA_VERSION = 1
_EVICT_CHUNK = 512

_SCHEMA = """
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

_SET_COUNTER = "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"


@dataclass
class _Delta:
    """In-memory changes of one transaction, applied only once it committed."""

    depth: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    opened: int = 0

    def drop(self, reason: str, kind: Kind, n: int = 1) -> None:
        key = f"{reason}.{kind.label}"
        self.counters[key] = self.counters.get(key, 0) + n


class Outbox:
    """SQLite-backed durable queue: put, take, ack, release; bounded by bytes and age; counts every drop."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 512 * 1024**2,
        max_age: float = 30 * 86400.0,
        when_full: WhenFull | str = WhenFull.DROP_OLDEST,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.max_age = float(max_age)
        self.when_full = WhenFull(when_full)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._lockfile: IO[bytes] | None = None
        self._sync = ""
        # mirrors of what the file holds, so stats never scan it
        self.depth: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.bytes = 0
        self.counters: dict[str, int] = dict.fromkeys(counter_names(), 0)
        self.open_count = 0
        self.run = 0
        self.corrupt_files = 0
        self.last_seq = 0
        self._inflight: dict[int, tuple[Kind, int]] = {}  # id → (kind, size)
        self._cursor: dict[Kind, int] = dict.fromkeys(Kind, 0)  # highest id handed out per kind

    @classmethod
    def from_section(cls, section: OutboxSection) -> Outbox:
        """An outbox as configured (not opened yet)."""
        return cls(section.path, max_bytes=section.max_bytes, max_age=section.max_age, when_full=section.when_full)

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, depth={sum(self.depth.values())}, bytes={self.bytes})"

    # ------------------------------------------------------------ open / close

    @property
    def is_open(self) -> bool:
        """The file is open."""
        return self._conn is not None

    def open(self, *, exclusive: bool = True) -> None:
        """Open (or create) the file; a corrupt or unreadable one is moved aside and replaced."""
        with self._lock:
            if self._conn is not None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutboxError(f"outbox {self.path}: cannot create its directory: {exc.strerror}") from None
            if exclusive:
                self._take_lock()
            try:
                self._connect()
            except sqlite3.DatabaseError as exc:
                if not self.path.exists() or _is_busy(exc):
                    self._release_lock()
                    raise OutboxError(f"outbox {self.path}: {exc}") from None
                moved = self._move_aside()
                log.error("outbox %s is unusable (%s); moved it to %s and started a new one", self.path, exc, moved)
                self._connect()
                self.corrupt_files += 1
                self._write_counters({"corrupt_files": self.corrupt_files})

    def close(self) -> None:
        """Close the file (rows not acknowledged stay for the next run)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
                self._conn = None
            self._inflight.clear()
            self._release_lock()

    def __enter__(self) -> Outbox:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self) -> None:
        # one agent per outbox: a second publisher would send every row twice
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            f = open(lock_path, "ab")  # noqa: SIM115 (held open for the outbox's lifetime)
        except OSError as exc:
            raise OutboxError(f"outbox {self.path}: cannot create {lock_path.name}: {exc.strerror}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise OutboxError(f"outbox {self.path} is in use by another process (an agent or a drain)") from None
        self._lockfile = f

    def _release_lock(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()  # closing drops the flock
            self._lockfile = None

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA cache_size=-2048")  # 2 MiB of page cache, whatever the backlog: memory stays flat
            conn.execute("PRAGMA journal_size_limit=8388608")  # the WAL shrinks back after checkpoints
            check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            conn.executescript(_SCHEMA)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer edge-agent (schema {version})")
            self._sync = "FULL"
            self._conn = conn
            self._load()
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def _load(self) -> None:
        conn = self._require()
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        self.counters = {k: int(counters.get(k, 0)) for k in counter_names()}
        self.corrupt_files = int(counters.get("corrupt_files", 0))
        self.last_seq = int(counters.get("seq", 0))
        self.run = int(counters.get("runs", 0)) + 1
        self.depth = dict.fromkeys(Kind, 0)
        self.bytes = 0
        for kind, n, size in conn.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM messages GROUP BY kind"):
            self.depth[Kind(kind)] = int(n)
            self.bytes += int(size)
        self.open_count = int(conn.execute("SELECT count(*) FROM open_anomalies").fetchone()[0])
        self._inflight.clear()
        self._cursor = dict.fromkeys(Kind, 0)
        self._write_counters({"runs": self.run})

    def _move_aside(self) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, target)
        except OSError as exc:
            self._release_lock()
            raise OutboxError(f"outbox {self.path} is unusable and cannot be moved aside: {exc.strerror}") from None
        for suffix in ("-wal", "-shm"):  # a stale WAL must not be replayed into the new file
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                with contextlib.suppress(OSError):
                    os.replace(side, target.with_name(target.name + suffix))
        return target

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"outbox {self.path} is not open")
        return self._conn

    @contextlib.contextmanager
    def _tx(self, sync: str) -> Iterator[sqlite3.Connection]:
        conn = self._require()
        if sync != self._sync:
            conn.execute(f"PRAGMA synchronous={sync}")
            self._sync = sync
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write_counters(self, values: Mapping[str, int]) -> None:
        with self._tx("FULL") as conn:
            conn.executemany(_SET_COUNTER, list(values.items()))

    # ------------------------------------------------------------ the queue

    def put(self, entries: Sequence[Entry], *, dropped_in_memory: Mapping[Kind, int] | None = None) -> int:
        """Store messages in one fsynced transaction, applying the bounds; returns how many were stored."""
        with self._lock:
            now = self._clock()
            delta = _Delta()
            for kind, n in (dropped_in_memory or {}).items():
                if n:
                    delta.drop("memory", kind, n)
            rows: list[tuple[int, int, float, int, int, str, bytes]] = []
            with self._tx("FULL") as conn:
                added = 0
                for kind in Kind:
                    group = [e for e in entries if e.kind == kind]
                    if not group:
                        continue
                    group = self._fit(conn, kind, group, added, delta)
                    rows.extend(
                        (
                            int(kind),
                            e.qos,
                            now if e.created is None else e.created,
                            self.run,
                            e.size,
                            e.topic,
                            e.payload,
                        )
                        for e in group
                    )
                    added += sum(e.size for e in group)
                # events first in id order, whatever order they came in
                _insert(conn, rows)
                # anomaly bookkeeping follows the detector, stored or dropped; a model's starts and ends
                # alternate, so its last one in the batch decides
                last: dict[str, Entry] = {}
                for e in entries:
                    if e.opens is not None:
                        last[e.opens[0]] = e
                    elif e.closes is not None:
                        last[e.closes[0]] = e
                for e in last.values():
                    if e.opens is not None:
                        conn.execute("INSERT OR REPLACE INTO open_anomalies VALUES (?, ?, ?)", e.opens)
                    elif e.closes is not None:
                        conn.execute("DELETE FROM open_anomalies WHERE model = ? AND anomaly_id = ?", e.closes)
                if last:
                    delta.opened = conn.execute("SELECT count(*) FROM open_anomalies").fetchone()[0] - self.open_count
                seq = max((e.seq for e in entries), default=0)
                values = {k: self.counters[k] + v for k, v in delta.counters.items()}
                if seq > self.last_seq:
                    values["seq"] = seq
                if values:
                    conn.executemany(_SET_COUNTER, list(values.items()))
            for r in rows:
                delta.depth[Kind(r[0])] += 1
                delta.bytes += r[4]
            self._apply(delta)
            self.last_seq = max(self.last_seq, seq)
            return len(rows)

    def _fit(self, conn: sqlite3.Connection, kind: Kind, group: list[Entry], added: int, delta: _Delta) -> list[Entry]:
        """Make room for a group of one kind by the policy; returns the entries that will be stored."""
        size = sum(e.size for e in group)
        over = self.bytes + delta.bytes + added + size - self.max_bytes
        if over <= 0:
            return group
        lower = [k for k in reversed(Kind) if k > kind]  # telemetry first
        victims = [*lower, kind] if self.when_full is WhenFull.DROP_OLDEST else lower
        over -= self._evict(conn, over, victims, "full", delta)
        if over <= 0:
            return group
        kept = list(group)
        while over > 0 and kept:
            gone = kept.pop(0) if self.when_full is WhenFull.DROP_OLDEST else kept.pop()
            over -= gone.size
            delta.drop("full", kind)
        return kept

    def _evict(self, conn: sqlite3.Connection, need: int, kinds: Sequence[Kind], reason: str, delta: _Delta) -> int:
        """Delete the oldest rows of `kinds` (in that order), skipping rows in flight, until `need` bytes are free."""
        freed = 0
        for kind in kinds:
            after = 0
            while freed < need:
                found = conn.execute(
                    "SELECT id, size FROM messages WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
                    (int(kind), after, _EVICT_CHUNK),
                ).fetchall()
                if not found:
                    break
                victims = []
                for rid, size in found:
                    after = rid
                    if rid in self._inflight:
                        continue
                    victims.append(rid)
                    freed += size
                    delta.bytes -= size
                    delta.depth[kind] -= 1
                    if freed >= need:
                        break
                _delete(conn, victims)
                delta.drop(reason, kind, len(victims))
            if freed >= need:
                break
        return freed

    def _apply(self, delta: _Delta) -> None:
        for kind, n in delta.depth.items():
            self.depth[kind] += n
        self.bytes += delta.bytes
        for k, v in delta.counters.items():
            self.counters[k] += v
        self.open_count += delta.opened

    def take(self, n: int) -> list[Row]:
        """Up to n rows not in flight: events first, then scores, then telemetry, each in insertion order."""
        with self._lock:
            conn = self._require()
            out: list[Row] = []
            for kind in Kind:
                if len(out) >= n or self.depth[kind] == 0:
                    continue
                while len(out) < n:
                    found = conn.execute(
                        "SELECT id, topic, payload, qos, created, run, size FROM messages "
                        "WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
                        (int(kind), self._cursor[kind], n - len(out)),
                    ).fetchall()
                    if not found:
                        break
                    for rid, topic, payload, qos, created, run, size in found:
                        self._cursor[kind] = rid
                        if rid in self._inflight:  # handed out before a release lowered the cursor
                            continue
                        self._inflight[rid] = (kind, size)
                        out.append(Row(rid, topic, bytes(payload), kind, qos, created, run))
            return out

    def ack(self, ids: Iterable[int], *, rejected: bool = False) -> int:
        """Delete acknowledged rows (no fsync: losing an ack only means a duplicate later); returns the count.

        rejected=True: the broker refused them for good; they are counted as drops (reason `rejected`).
        """
        with self._lock:
            known = [(rid, self._inflight[rid]) for rid in ids if rid in self._inflight]
            if not known:
                return 0
            delta = _Delta()
            if rejected:
                for _, (kind, _) in known:
                    delta.drop("rejected", kind)
            with self._tx("FULL" if rejected else "NORMAL") as conn:
                _delete(conn, [rid for rid, _ in known])
                if delta.counters:
                    conn.executemany(_SET_COUNTER, [(k, self.counters[k] + v) for k, v in delta.counters.items()])
            for rid, (kind, size) in known:
                del self._inflight[rid]
                delta.depth[kind] -= 1
                delta.bytes -= size
            self._apply(delta)
            return len(known)

    def release(self, ids: Iterable[int] | None = None) -> None:
        """Give rows in flight back (nack): they are taken again, in order; None releases all."""
        with self._lock:
            chosen = list(self._inflight) if ids is None else [i for i in ids if i in self._inflight]
            for rid in chosen:
                kind, _ = self._inflight.pop(rid)
                self._cursor[kind] = min(self._cursor[kind], rid - 1)

    @property
    def in_flight(self) -> int:
        """Rows handed out and neither acknowledged nor released."""
        return len(self._inflight)

    def expire(self) -> int:
        """Drop rows older than max_age (counted as age drops); returns how many."""
        with self._lock:
            cutoff = self._clock() - self.max_age
            delta = _Delta()
            with self._tx("NORMAL") as conn:
                for kind in Kind:
                    old = [
                        (rid, size)
                        for rid, size in conn.execute(
                            "SELECT id, size FROM messages WHERE kind = ? AND created < ? ORDER BY id",
                            (int(kind), cutoff),
                        )
                        if rid not in self._inflight
                    ]
                    if not old:
                        continue
                    _delete(conn, [rid for rid, _ in old])
                    delta.depth[kind] -= len(old)
                    delta.bytes -= sum(size for _, size in old)
                    delta.drop("age", kind, len(old))
                if delta.counters:
                    conn.executemany(_SET_COUNTER, [(k, self.counters[k] + v) for k, v in delta.counters.items()])
            self._apply(delta)
            return sum(delta.counters.values())

    # ------------------------------------------------------------ open anomalies, stats, export

    def open_anomalies(self) -> list[OpenAnomaly]:
        """Anomalies whose start was written and whose end was not (the agent died in between)."""
        with self._lock:
            conn = self._require()
            rows = conn.execute("SELECT model, anomaly_id, record FROM open_anomalies ORDER BY model")
            return [OpenAnomaly(m, a, bytes(r)) for m, a, r in rows]

    def stats(self) -> OutboxStats:
        """Depth, bytes, oldest message, drops."""
        with self._lock:
            conn = self._require()
            oldest = None
            for kind in Kind:
                if self.depth[kind]:
                    row = conn.execute(
                        "SELECT created FROM messages WHERE kind = ? ORDER BY id LIMIT 1", (int(kind),)
                    ).fetchone()
                    if row is not None:
                        oldest = row[0] if oldest is None else min(oldest, row[0])
            return self._stats(oldest)

    def _stats(self, oldest: float | None) -> OutboxStats:
        return OutboxStats(
            path=str(self.path),
            depth={k.label: v for k, v in self.depth.items()},
            bytes=self.bytes,
            max_bytes=self.max_bytes,
            oldest=oldest,
            in_flight=len(self._inflight),
            dropped=dict(self.counters),
            open_anomalies=self.open_count,
            runs=self.run,
            corrupt_files=self.corrupt_files,
            last_seq=self.last_seq,
        )

    def quick_stats(self) -> OutboxStats:
        """Stats from memory only (no query, no lock): safe to call from the event loop."""
        return self._stats(None)

    def rows(self) -> Iterator[Row]:
        """Every stored row in publishing order (streamed: memory stays flat)."""
        conn = self._require()
        for kind in Kind:
            cur = conn.execute(
                "SELECT id, topic, payload, qos, created, run FROM messages WHERE kind = ? ORDER BY id", (int(kind),)
            )
            for rid, topic, payload, qos, created, run in cur:
                yield Row(rid, topic, bytes(payload), kind, qos, created, run)


# Many rows per statement: sqlite3 releases the GIL around every step, and with a busy event loop each
# re-acquisition can wait a whole switch interval (5 ms), so one step per row starves this thread.
_ROWS_PER_INSERT = 128
_IDS_PER_DELETE = 512
_INSERT = "INSERT INTO messages(kind, qos, created, run, size, topic, payload) VALUES "


def _insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        conn.execute(_INSERT + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)), [v for row in chunk for v in row])


def _delete(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    for i in range(0, len(ids), _IDS_PER_DELETE):
        chunk = ids[i : i + _IDS_PER_DELETE]
        conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text
