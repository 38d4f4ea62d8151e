"""The outbox file under the queue: opening it (and what to do when it is damaged), transactions, the
counters mirrored in memory, retries on a full disk, and stats. `store.Outbox` is the queue built on it.

Every drop is counted in the file itself, with the limits it was written under and its row count per kind
after every transaction (so what a damaged file held can be counted). A file that is not a database, fails
the integrity check, or whose WAL or main file is damaged in a way SQLite would not report (`walcheck`), is
moved aside as `<name>.corrupt-<UTC timestamp>`; the rows that still read go into a new file, and one error
log says what was recovered and what was lost (`recover`). A full disk (`disk`): a write that fails is
retried once after a checkpoint; deletes and checkpoints get room from a reserve file. One process at a
time: `<name>.lock` is flocked while open (stats and export read without it).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

from edge_agent.config import WhenFull
from edge_agent.outbox import recover, schema, walcheck
from edge_agent.outbox.disk import DEFAULT_CHECKPOINT, RESERVE_MIN, Disk, describe, is_environment, is_full
from edge_agent.outbox.rows import Kind, OutboxError, OutboxStats, Row, counter_names
from edge_agent.types import OpenAnomaly

log = logging.getLogger("edge_agent.outbox")

T = TypeVar("T")


class StoreUnavailable(OutboxError):
    """The file is fine but cannot be opened now (disk full, I/O error, read-only)."""


WHEN_FULL_CODES = {WhenFull.DROP_OLDEST: 0, WhenFull.DROP_NEWEST: 1}


def limit_counters(max_bytes: int, max_age: float, when_full: WhenFull) -> dict[str, int]:
    """The limits a file is written under, as counters (so `outbox stats` shows them, not the defaults)."""
    return {
        "limit.max_bytes": int(max_bytes),
        "limit.max_age_ms": round(max_age * 1000),
        "limit.when_full": WHEN_FULL_CODES[when_full],
    }


@dataclass
class Delta:
    """In-memory changes of one transaction, applied only once it committed."""

    depth: dict[Kind, int] = field(default_factory=lambda: dict.fromkeys(Kind, 0))
    bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    opened: int = 0

    def drop(self, reason: str, kind: Kind, n: int = 1) -> None:
        key = f"{reason}.{kind.label}"
        self.counters[key] = self.counters.get(key, 0) + n

    def remove(self, kind: Kind, size: int) -> None:
        self.depth[kind] -= 1
        self.bytes -= size


class OutboxFile:
    """An outbox file, open or not, with its counters mirrored in memory (see the module doc)."""

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
        self._sync = ""
        self._disk = Disk(self.path)
        self._checksums = schema.Checksums()
        self._page_size = 4096
        self._checkpoint_pages = DEFAULT_CHECKPOINT
        self._unsaved: dict[str, int] = {}  # counters a full disk kept from being written: they go with the next put
        # mirrors of what the file holds, so stats never scan it
        self.depth: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.bytes = 0
        self.counters: dict[str, int] = dict.fromkeys(counter_names(), 0)
        self.open_count = 0
        self.run = 0
        self.corrupt_files = 0
        self.lost_transactions = 0
        self.last_seq = 0
        self.targets = 1  # the sinks new rows wait for (rows.SINK_BITS); set by the writer from mqtt.payloads
        # handed out and not yet acknowledged: id → (kind, size, pending bits as read, bits of the sinks holding it)
        self._inflight: dict[int, tuple[Kind, int, int, int]] = {}
        self._cursor: dict[int, dict[Kind, int]] = {}  # per sink bit: highest id handed out per kind
        self._skip: set[int] = set()  # rows that failed their checksum and could not be deleted yet

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, depth={sum(self.depth.values())}, bytes={self.bytes})"

    # ------------------------------------------------------------ open / close

    @property
    def is_open(self) -> bool:
        """The file is open."""
        return self._conn is not None

    def open(self, *, exclusive: bool = True) -> None:
        """Open (or create) the file; a corrupt or unreadable one is moved aside and replaced.

        OutboxBusy: another process holds it; OutboxError: it cannot be opened now (disk full, not writable).
        """
        with self._lock:
            if self._conn is not None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutboxError(f"outbox {self.path}: cannot create its directory: {describe(exc)}") from None
            if exclusive:
                self._disk.lock()
            try:
                try:
                    self._open_file()
                except StoreUnavailable:
                    # even opening needs room (SQLite maps a 32 KiB -shm): the reserve is there for this too
                    if not (exclusive and self._disk.release_reserve()):
                        raise
                    self._open_file()
            except BaseException:
                self._disk.unlock()
                raise
            self._disk.ensure_reserve()
            self._tune()

    def _open_file(self) -> None:
        try:
            damage = walcheck.inspect(self.path)
        except (OSError, ValueError, MemoryError) as exc:
            log.warning("outbox %s: cannot check its WAL before opening it (%s)", self.path, exc)
            damage = None
        if damage is None:
            try:
                self._connect()
                return
            except sqlite3.DatabaseError as exc:
                if not self.path.exists() or _is_busy(exc) or is_environment(exc):
                    cause = describe(exc)
                    free = self._disk.free()
                    if free is not None and free < RESERVE_MIN and cause != "disk full":
                        cause = f"disk full: {cause}"
                    raise StoreUnavailable(f"outbox {self.path}: {cause}") from None
                damage = walcheck.Damage(str(exc))
        moved = recover.move_aside(self.path)
        found = recover.salvage(moved, damage)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            recover.report(self.path, moved, damage, found, copied=False)
            raise OutboxError(f"outbox {self.path}: cannot start a new file: {describe(exc)}") from None
        recover.report(self.path, moved, damage, found, copied=self._adopt(found))

    def _adopt(self, found: recover.Salvage) -> bool:
        """Copy what was recovered from a damaged file into this new one, with the loss counted; True if copied."""
        old = found.counters
        values = {name: old.get(name, 0) for name in counter_names()}
        for kind, n in (found.lost_rows() or {}).items():
            values[f"corrupt.{kind.label}"] += n
        for kind, n in found.invalid.items():
            values[f"corrupt.{kind.label}"] += n
        values["seq"] = max(old.get("seq", 0), self.last_seq)
        values["runs"] = max(old.get("runs", 0), self.run)
        values["corrupt_files"] = old.get("corrupt_files", 0) + 1
        values["lost_transactions"] = old.get("lost_transactions", 0) + found.lost_transactions
        copied = True
        try:
            with self._tx("FULL") as conn:
                schema.insert(conn, found.rows)
                conn.executemany("INSERT OR REPLACE INTO open_anomalies VALUES (?, ?, ?)", found.open_anomalies)
                conn.executemany(schema.SET_COUNTER, list(values.items()))
        except sqlite3.Error:
            copied = False
            self._save({k: v for k, v in values.items() if k != "seq"})
        self._load()
        return copied

    def close(self) -> None:
        """Close the file (rows not acknowledged stay for the next run)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.close()
                self._conn = None
            self._inflight.clear()
            self._disk.unlock()

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        conn = schema.connect(self.path)
        try:
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            self._checkpoint_pages = DEFAULT_CHECKPOINT
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
        self.lost_transactions = int(counters.get("lost_transactions", 0))
        self.last_seq = int(counters.get("seq", 0))
        self.run = int(counters.get("runs", 0)) + 1
        self.depth = dict.fromkeys(Kind, 0)
        self.bytes = 0
        for kind, n, size in conn.execute("SELECT kind, count(*), coalesce(sum(size), 0) FROM messages GROUP BY kind"):
            self.depth[Kind(kind)] = int(n)
            self.bytes += int(size)
        self.open_count = int(conn.execute("SELECT count(*) FROM open_anomalies").fetchone()[0])
        self._inflight.clear()
        self._skip.clear()
        self._cursor = {}
        limits = limit_counters(self.max_bytes, self.max_age, self.when_full)
        self._save({"runs": self.run, **limits, **self._row_counts(Delta())})

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
            conn.execute("COMMIT")  # a full disk can fail the commit itself: roll back then too
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _write_counters(self, values: Mapping[str, int]) -> None:
        with self._tx("FULL") as conn:
            conn.executemany(schema.SET_COUNTER, list(values.items()))

    def set_targets(self, targets: int) -> int:
        """The sinks new rows wait for from now on; stored rows only for other sinks go to these (returns how
        many). Rows a sink that is no longer configured holds in flight are its own until it releases them."""
        with self._lock:
            self.targets = int(targets)
            if self._conn is None:
                return 0
            with self._tx("FULL") as conn:
                return schema.retarget(conn, self.targets)

    def _save(self, values: Mapping[str, int]) -> None:
        """Write counters now, or with the next put when the disk is full."""
        try:
            self._retry_full(lambda: self._write_counters(values), reserve=False)
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
            self._unsaved.update(values)

    def _row_counts(self, delta: Delta) -> dict[str, int]:
        # rows per kind after a transaction, stored with it: what a damaged file held can then be counted
        return {f"rows.{k.label}": self.depth[k] + delta.depth[k] for k in Kind}

    # ------------------------------------------------------------ a full disk

    def _retry_full(self, fn: Callable[[], T], *, reserve: bool) -> T:
        """fn(); on a full disk, checkpoint the WAL (its pages move into the main file, the WAL is truncated)
        and retry; with `reserve`, release the reserve file and retry once more."""
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_full(exc):
                raise
        self._checkpoint()
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not (is_full(exc) and reserve and self._disk.release_reserve()):
                raise
        self._checkpoint()
        return fn()

    def _checkpoint(self) -> bool:
        try:
            busy = self._require().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            return False
        return not busy

    def _tune(self) -> None:
        """After a write: a small WAL while free space is low, and the reserve back once there is room."""
        pages = self._disk.checkpoint_pages(self._page_size)
        if pages != self._checkpoint_pages and self._conn is not None:
            self._conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
            self._checkpoint_pages = pages
        if self._disk.missing:
            self._disk.ensure_reserve(margin=self._disk.reserve_size)

    # ------------------------------------------------------------ the queue

    def _apply(self, delta: Delta) -> None:
        for kind, n in delta.depth.items():
            self.depth[kind] += n
        self.bytes += delta.bytes
        for k, v in delta.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        self.open_count += delta.opened

    def _remove(self, ids: Sequence[int], delta: Delta, sync: str, keep: Sequence[tuple[int, int]] = ()) -> None:
        """Delete rows, set `keep`'s (pending, id) (rows other sinks still need), and write the counters `delta`
        changes, in one transaction; then apply it."""
        with self._tx(sync) as conn:
            schema.delete(conn, ids)
            if keep:
                conn.executemany("UPDATE messages SET pending = ? WHERE id = ?", keep)
            values = {k: self.counters.get(k, 0) + v for k, v in delta.counters.items()}
            values.update(self._row_counts(delta))
            conn.executemany(schema.SET_COUNTER, list(values.items()))
        self._apply(delta)

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
            max_age=self.max_age,
            when_full=self.when_full.value,
            oldest=oldest,
            in_flight=len(self._inflight),
            dropped=dict(self.counters),
            open_anomalies=self.open_count,
            runs=self.run,
            corrupt_files=self.corrupt_files,
            lost_transactions=self.lost_transactions,
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


def _is_busy(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text
