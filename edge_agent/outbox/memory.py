"""The outbox's memory queue: messages waiting for the disk, bounded, and a source of rows while it cannot be written.

Normally the writer empties it into the file at every commit. While the file cannot be written (disk full,
not openable) messages stay here and sinks may take them as rows: ids are negative (the file's are positive),
an ack removes them, a release puts them back in front. The bound (`limit`) applies the outbox's `when_full`
policy, telemetry giving way first, then scores; every message dropped is counted (reason `memory`) until the
file takes the counts. Anomaly starts and ends that never reach the file (delivered from here, or dropped)
are remembered for its open-anomaly bookkeeping, one per model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from edge_agent.config import WhenFull
from edge_agent.outbox.rows import Entry, Kind, Row


class MemoryQueue:
    """Entries per kind in submission order; bounded; rows handed out from it are tracked until acked."""

    def __init__(self, limit: int, when_full: WhenFull) -> None:
        self.limit = limit
        self.when_full = when_full
        self._queues: dict[Kind, deque[Entry]] = {k: deque() for k in Kind}
        self._n = 0
        self.out: dict[int, Entry] = {}  # handed to a sink, not yet acknowledged: id (< 0) → entry
        self._next_id = -1
        self.dropped: dict[str, int] = {}  # "<reason>.<kind>" → drops the file has not counted yet
        self.booked: dict[str, Entry] = {}  # model → latest start/end the file has not seen
        self.booked_seq = 0

    def __len__(self) -> int:
        return self._n

    def add(self, entry: Entry) -> int:
        """Queue an entry; returns how many entries were dropped to keep the bound (0 or 1)."""
        if self._n < self.limit:
            self._queues[entry.kind].append(entry)
            self._n += 1
            return 0
        for kind in reversed(Kind):  # telemetry, then scores give way to anything above them
            if kind <= entry.kind:
                break
            if self._queues[kind]:
                self._drop(self._queues[kind].popleft(), "memory")
                self._queues[entry.kind].append(entry)
                return 1
        own = self._queues[entry.kind]
        if self.when_full is WhenFull.DROP_OLDEST and own:
            self._drop(own.popleft(), "memory")
            own.append(entry)
        else:
            self._drop(entry, "memory")
        return 1

    def _drop(self, entry: Entry, reason: str) -> None:
        key = f"{reason}.{entry.kind.label}"
        self.dropped[key] = self.dropped.get(key, 0) + 1
        self._book(entry)

    def _book(self, entry: Entry) -> None:
        model = entry.opens[0] if entry.opens is not None else entry.closes[0] if entry.closes is not None else None
        if model is not None:
            prev = self.booked.get(model)
            if prev is None or entry.seq >= prev.seq:
                self.booked[model] = entry
        self.booked_seq = max(self.booked_seq, entry.seq)

    # ------------------------------------------------------------ the writer

    def drain(self, limit: int | None = None) -> list[Entry]:
        """Remove up to `limit` entries (all when None), events first, each kind oldest first."""
        if limit is None or limit >= self._n:
            batch = [e for k in Kind for e in self._queues[k]]
            for q in self._queues.values():
                q.clear()
        else:
            batch = []
            for k in Kind:
                q = self._queues[k]
                while q and len(batch) < limit:
                    batch.append(q.popleft())
        self._n -= len(batch)
        return batch

    def unshift(self, batch: Iterable[Entry]) -> None:
        """Put entries back in front, in their order (a write that failed, rows given back)."""
        by_kind: dict[Kind, list[Entry]] = {}
        for e in batch:
            by_kind.setdefault(e.kind, []).append(e)
        for kind, entries in by_kind.items():
            self._queues[kind].extendleft(reversed(entries))
            self._n += len(entries)

    def accounting(self) -> tuple[dict[str, int], dict[str, Entry], int]:
        """Take the drops and bookkeeping the file has not seen yet (give them back with `restore` on failure)."""
        out = (self.dropped, self.booked, self.booked_seq)
        self.dropped, self.booked, self.booked_seq = {}, {}, 0
        return out

    def restore(self, accounting: tuple[dict[str, int], dict[str, Entry], int]) -> None:
        """Undo `accounting` after a failed write."""
        dropped, booked, seq = accounting
        for k, n in dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + n
        for e in booked.values():
            self._book(e)
        self.booked_seq = max(self.booked_seq, seq)

    @property
    def has_accounting(self) -> bool:
        """Drops or bookkeeping wait for the file."""
        return bool(self.dropped or self.booked or self.booked_seq)

    # ------------------------------------------------------------ sinks

    def take(self, n: int, *, run: int, now: float) -> list[Row]:
        """Up to n rows from the front, events first; they stay tracked until ack or release."""
        out: list[Row] = []
        for kind in Kind:
            q = self._queues[kind]
            while q and len(out) < n:
                e = q.popleft()
                rid = self._next_id
                self._next_id -= 1
                self.out[rid] = e
                out.append(Row(rid, e.topic, e.payload, kind, e.qos, now if e.created is None else e.created, run))
        self._n -= len(out)
        return out

    def ack(self, ids: Iterable[int], *, rejected: bool = False) -> int:
        """Forget delivered rows (rejected: refused for good, counted as dropped); returns how many were known."""
        n = 0
        for rid in ids:
            e = self.out.pop(rid, None)
            if e is None:
                continue
            n += 1
            if rejected:
                self._drop(e, "rejected")
            else:
                self._book(e)
        return n

    def release(self, ids: Iterable[int] | None = None) -> None:
        """Give rows back (None: all): they go in front again, in the order they were taken."""
        chosen = sorted(self.out if ids is None else (i for i in ids if i in self.out), reverse=True)
        self.unshift(self.out.pop(rid) for rid in chosen)
