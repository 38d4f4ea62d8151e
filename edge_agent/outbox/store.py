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
  Every drop is counted by reason and kind, in the file itself, with the limits it was written under.
- Durability: every `put` is one transaction whose commit fsyncs the WAL (synchronous=FULL); how often
  the publisher commits is `outbox.sync` (full: as soon as messages arrive, batched: every
  commit_interval). Deletes after acks are not fsynced: a crash then costs a duplicate, never a loss.
- Integrity: every row carries a crc32 of its topic and payload, checked when it is taken; a row that fails
  it is dropped and counted (reason `corrupt`), never published.
- A full disk (`disk`): writes fail and the caller keeps messages in memory; deletes and checkpoints get
  room from a reserve file, so acknowledged rows are still deleted.
- Damage: a damaged file is moved aside and what still reads is recovered into a new one, with the loss
  logged and counted (`file`, `walcheck`, `recover`). One process at a time (`<name>.lock`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence

from edge_agent.config import OutboxSection, WhenFull
from edge_agent.outbox import schema
from edge_agent.outbox.disk import is_full
from edge_agent.outbox.file import Delta, OutboxFile
from edge_agent.outbox.rows import Entry, Kind, Row

log = logging.getLogger("edge_agent.outbox")

_EVICT_CHUNK = 512
_SMALL_DELETE = 16  # ids per transaction when even the reserve cannot take a bigger one
_TAKE = (
    "SELECT id, CAST(topic AS BLOB), payload, qos, created, run, size, crc, pending FROM messages "
    "WHERE kind = ? AND id > ? AND pending & ? != 0 ORDER BY id LIMIT ?"
)


class Outbox(OutboxFile):
    """SQLite-backed durable queue: put, take, ack, release; bounded by bytes and age; counts every drop."""

    @classmethod
    def from_section(cls, section: OutboxSection) -> Outbox:
        """An outbox as configured (not opened yet)."""
        return cls(section.path, max_bytes=section.max_bytes, max_age=section.max_age, when_full=section.when_full)

    def put(
        self,
        entries: Sequence[Entry],
        *,
        dropped: Mapping[str, int] | None = None,
        booked: Sequence[Entry] = (),
        seq: int = 0,
    ) -> int:
        """Store messages in one fsynced transaction, applying the bounds; returns how many were stored.

        dropped: "<reason>.<kind>" → drops made elsewhere (the memory queue), added to the counters;
        booked: messages not stored (delivered from memory, or dropped) whose anomaly bookkeeping still counts;
        seq: the highest event sequence number among those.
        """
        with self._lock:
            return self._retry_full(lambda: self._put(entries, dropped or {}, booked, seq), reserve=False)

    def _put(self, entries: Sequence[Entry], dropped: Mapping[str, int], booked: Sequence[Entry], seq: int) -> int:
        now = self._clock()
        delta = Delta()
        for key, n in dropped.items():
            if n:
                delta.counters[key] = delta.counters.get(key, 0) + n
        rows: list[tuple[int, int, float, int, int, str, bytes, int]] = []
        owed: list[int] = []  # each row's sinks: those the memory queue still owes it to, else the targets
        crc = self._checksums.of
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
                        crc(e.topic, e.payload),
                    )
                    for e in group
                )
                owed.extend((e.sinks & self.targets) or self.targets for e in group)
                added += sum(e.size for e in group)
                delta.depth[kind] += len(group)
            # events first in id order, whatever order they came in
            start = 0
            for i in range(1, len(rows) + 1):  # runs of rows for the same sinks, one insert each
                if i == len(rows) or owed[i] != owed[start]:
                    schema.insert(conn, rows[start:i], owed[start])
                    start = i
            # anomaly bookkeeping follows the detector, stored, delivered from memory or dropped; a model's
            # starts and ends alternate, so its latest one decides
            last: dict[str, Entry] = {}
            for e in (*booked, *entries):
                model = e.opens[0] if e.opens is not None else e.closes[0] if e.closes is not None else None
                if model is not None and (model not in last or e.seq >= last[model].seq):
                    last[model] = e
            for e in last.values():
                if e.opens is not None:
                    conn.execute("INSERT OR REPLACE INTO open_anomalies VALUES (?, ?, ?)", e.opens)
                elif e.closes is not None:
                    conn.execute("DELETE FROM open_anomalies WHERE model = ? AND anomaly_id = ?", e.closes)
            if last:
                delta.opened = conn.execute("SELECT count(*) FROM open_anomalies").fetchone()[0] - self.open_count
            seq = max(seq, max((e.seq for e in entries), default=0))
            values = {k: self.counters.get(k, 0) + v for k, v in delta.counters.items()}
            values.update(self._unsaved)
            if seq > self.last_seq:
                values["seq"] = seq
            values.update(self._row_counts(delta))
            conn.executemany(schema.SET_COUNTER, list(values.items()))
        delta.bytes += sum(r[4] for r in rows)
        self._apply(delta)
        self._unsaved.clear()
        self.last_seq = max(self.last_seq, seq)
        self._tune()
        return len(rows)

    def _fit(self, conn: sqlite3.Connection, kind: Kind, group: list[Entry], added: int, delta: Delta) -> list[Entry]:
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

    def _evict(self, conn: sqlite3.Connection, need: int, kinds: Sequence[Kind], reason: str, delta: Delta) -> int:
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
                    delta.remove(kind, size)
                    if freed >= need:
                        break
                schema.delete(conn, victims)
                delta.drop(reason, kind, len(victims))
            if freed >= need:
                break
        return freed

    def _sink(self, sink: int | None) -> int:
        # None: the first configured sink (the only one, mostly)
        return sink if sink is not None else self.targets & -self.targets

    def take(self, n: int, sink: int | None = None) -> list[Row]:
        """Up to n rows the sink (a rows.SINK_BITS bit; None: the first configured) has still to deliver and does
        not hold: events first, then scores, then telemetry, each in insertion order.

        A row whose checksum fails is not handed out: it is deleted and counted (reason `corrupt`).
        """
        with self._lock:
            conn = self._require()
            bit = self._sink(sink)
            out: list[Row] = []
            bad: list[tuple[int, Kind, int]] = []
            check = self._checksums.check
            inflight, skip = self._inflight, self._skip
            cursor = self._cursor.setdefault(bit, dict.fromkeys(Kind, 0))
            for kind in Kind:
                if len(out) >= n or self.depth[kind] == 0:
                    continue
                while len(out) < n:
                    found = conn.execute(_TAKE, (int(kind), cursor[kind], bit, n - len(out))).fetchall()
                    if not found:
                        break
                    for rid, topic, payload, qos, created, run, size, crc, pending in found:
                        cursor[kind] = rid
                        held = inflight.get(rid)
                        # handed out before a release lowered the cursor
                        if (held is not None and held[3] & bit) or rid in skip:
                            continue
                        text = check(topic, payload, crc)
                        if text is None:
                            bad.append((rid, kind, size))
                            continue
                        inflight[rid] = (kind, size, held[2] if held else pending, (held[3] if held else 0) | bit)
                        out.append(Row(rid, text, payload, kind, qos, created, run))
            if bad:
                self._drop_corrupt(bad)
            return out

    def _drop_corrupt(self, bad: list[tuple[int, Kind, int]]) -> None:
        ids = [rid for rid, _, _ in bad]
        self._skip.update(ids)
        log.error(
            "outbox %s: %d stored message(s) failed their checksum (ids %s); dropped and counted, never published",
            self.path,
            len(ids),
            ", ".join(map(str, ids[:10])) + (" …" if len(ids) > 10 else ""),
        )
        delta = Delta()
        for _, kind, size in bad:
            delta.remove(kind, size)
            delta.drop("corrupt", kind)
        try:
            self._retry_full(lambda: self._remove(ids, delta, "FULL"), reserve=True)
        except sqlite3.Error as exc:
            log.error("outbox %s: cannot delete them (%s); they are skipped until the next start", self.path, exc)
            return
        self._skip.difference_update(ids)

    def ack(self, ids: Iterable[int], *, rejected: bool = False, sink: int | None = None) -> int:
        """The sink delivered these rows: deleted when no other sink still needs them (no fsync: losing an ack
        only means a duplicate later); returns the count.

        rejected=True: the broker refused them for good; they are counted as drops (reason `rejected`).
        On a full disk the WAL is checkpointed, the reserve released, and the deletes split up until they fit.
        """
        with self._lock:
            bit = self._sink(sink)
            known = [rid for rid in ids if rid in self._inflight and self._inflight[rid][3] & bit]
            if not known:
                return 0
            try:
                self._retry_full(lambda: self._ack(known, rejected, bit), reserve=True)
            except sqlite3.OperationalError as exc:
                if not is_full(exc):
                    raise
                for i in range(0, len(known), _SMALL_DELETE):
                    part = known[i : i + _SMALL_DELETE]
                    self._retry_full(lambda part=part: self._ack(part, rejected, bit), reserve=True)  # type: ignore[misc]
            return len(known)

    def _ack(self, ids: list[int], rejected: bool, bit: int) -> None:
        delta = Delta()
        gone: list[int] = []
        keep: list[tuple[int, int]] = []  # (pending left, id): rows another sink has still to deliver
        for rid in ids:
            kind, size, pending, _ = self._inflight[rid]
            left = pending & ~bit
            if left:
                keep.append((left, rid))
                continue
            gone.append(rid)
            delta.remove(kind, size)
            if rejected:
                delta.drop("rejected", kind)
        self._remove(gone, delta, "FULL" if rejected else "NORMAL", keep)
        for rid in gone:
            del self._inflight[rid]
        for left, rid in keep:
            kind, size, _, holders = self._inflight[rid]
            if holders & ~bit:
                self._inflight[rid] = (kind, size, left, holders & ~bit)
            else:
                del self._inflight[rid]

    def release(self, ids: Iterable[int] | None = None, sink: int | None = None) -> None:
        """Give the sink's rows in flight back (nack): it takes them again, in order; None releases all of them."""
        with self._lock:
            bit = self._sink(sink)
            held = self._inflight
            chosen = [i for i in (held if ids is None else ids) if i in held and held[i][3] & bit]
            cursor = self._cursor.setdefault(bit, dict.fromkeys(Kind, 0))
            for rid in chosen:
                kind, size, pending, holders = held[rid]
                if holders & ~bit:
                    held[rid] = (kind, size, pending, holders & ~bit)
                else:
                    del held[rid]
                cursor[kind] = min(cursor[kind], rid - 1)

    @property
    def in_flight(self) -> int:
        """Rows handed out and neither acknowledged nor released."""
        return len(self._inflight)

    def expire(self) -> int:
        """Drop rows older than max_age (counted as age drops); returns how many."""
        with self._lock:
            conn = self._require()
            cutoff = self._clock() - self.max_age
            delta = Delta()
            old: list[int] = []
            for kind in Kind:
                for rid, size in conn.execute(
                    "SELECT id, size FROM messages WHERE kind = ? AND created < ? ORDER BY id", (int(kind), cutoff)
                ):
                    if rid not in self._inflight:
                        old.append(rid)
                        delta.remove(kind, size)
                        delta.drop("age", kind)
            if old:
                self._retry_full(lambda: self._remove(old, delta, "NORMAL"), reserve=True)
            return len(old)

    # ------------------------------------------------------------ open anomalies, stats, export
