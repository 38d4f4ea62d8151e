"""The outbox's memory queue: messages waiting for the disk, bounded, and a source of rows while it cannot be written.

Normally the writer empties it into the file at every commit. While the file cannot be written (disk full,
not openable) messages stay here and every sink takes them as rows, like the file's: each entry owes the sinks
configured when it was submitted (a bit each, rows.SINK_BITS); a sink takes what it owes and does not hold,
its ack clears its bit (the entry leaves when no sink owes it), its release gives it back in front. Ids are
negative (the file's are positive) and shared by the sinks. When the file takes writes again, what is still
owed is written with exactly the bits still owed (a sink that acked does not get it twice). The bound
(`limit`) applies the outbox's `when_full` policy, telemetry giving way first, then scores; every message
dropped is counted (reason `memory`) until the file takes the counts, and one some sink already had is also
counted per sink left without it (`partial`, logged once per episode). Anomaly starts and ends that never
reach the file (delivered from here, or dropped) are remembered for its open-anomaly bookkeeping, one per model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable

from edge_agent.config import WhenFull
from edge_agent.outbox.rows import SINK_BITS, Entry, Kind, Row

log = logging.getLogger("edge_agent.outbox")


class Slot:
    """One entry in memory: the sinks that still owe it a delivery and those holding it (taken, not acked)."""

    __slots__ = ("entry", "full", "gone", "held", "id", "owed")

    def __init__(self, entry: Entry, rid: int, owed: int) -> None:
        self.entry, self.id = entry, rid
        self.owed = self.full = owed
        self.held = 0
        self.gone = False  # left memory: the deques drop it lazily (removing from a deque's middle is O(n))


class MemoryQueue:
    """Entries per kind in submission order, each owed to a set of sinks; bounded; tracked until every sink acked."""

    def __init__(self, limit: int, when_full: WhenFull, targets: int = 1) -> None:
        self.limit = limit
        self.when_full = when_full
        self.targets = targets  # the sinks a new entry is owed to (the writer keeps it as mqtt.payloads)
        self._queues: dict[Kind, deque[Slot]] = {k: deque() for k in Kind}  # every live slot, oldest first
        # sink bit → slots it may take, in order; built when a sink first takes (the file failing), so that
        # while the file takes everything an entry costs one slot and no per-sink bookkeeping
        self._waiting: dict[int, dict[Kind, deque[Slot]]] = {}
        self._live: dict[int, Slot] = {}  # id (< 0) → slot still in memory
        self._next_id = -1
        self.dropped: dict[str, int] = {}  # "<reason>.<kind>" → drops the file has not counted yet
        self.partial: dict[str, int] = {}  # sink → drops of messages another sink had delivered (also in dropped)
        self._partial_said = False
        self.booked: dict[str, Entry] = {}  # model → latest start/end the file has not seen
        self.booked_seq = 0

    def __len__(self) -> int:
        return len(self._live)

    @property
    def held(self) -> int:
        """Entries a sink took and has not acknowledged or given back."""
        return sum(1 for s in self._live.values() if s.held)

    def add(self, entry: Entry) -> int:
        """Queue an entry; returns how many entries left memory to keep the bound (0 or 1)."""
        if len(self._live) < self.limit:
            self._append(entry)
            return 0
        for kind in reversed(Kind):  # telemetry, then scores give way to anything above them
            if kind <= entry.kind:
                break
            victim = self._oldest(kind)
            if victim is not None:
                self._drop(victim, "memory")
                self._append(entry)
                return 1
        victim = self._oldest(entry.kind) if self.when_full is WhenFull.DROP_OLDEST else None
        if victim is not None:
            self._drop(victim, "memory")
            self._append(entry)
        else:
            self._count("memory", entry.kind)
            self._book(entry)
        return 1

    def _append(self, entry: Entry, *, front: bool = False) -> Slot:
        slot = Slot(entry, self._next_id, entry.sinks or self.targets)
        self._next_id -= 1
        self._live[slot.id] = slot
        bound = 2 * len(self._live) + 64
        q = self._queues[entry.kind]
        q.appendleft(slot) if front else q.append(slot)
        if len(q) > bound:  # entries acked out of order linger in the middle
            self._queues[entry.kind] = deque(s for s in q if not s.gone)
        for bit, queues in self._waiting.items():
            if slot.owed & bit:
                q = queues[entry.kind]
                q.appendleft(slot) if front else q.append(slot)
                if len(q) > bound:  # a sink that does not take keeps the dropped: keep it bounded
                    queues[entry.kind] = deque(s for s in q if not s.gone)
        return slot

    def _sink(self, bit: int) -> dict[Kind, deque[Slot]]:
        if not self._waiting:  # a sink takes for the first time since memory was last empty
            for b in SINK_BITS.values():
                self._waiting[b] = {
                    k: deque(s for s in q if not s.gone and s.owed & b and not s.held & b)
                    for k, q in self._queues.items()
                }
        return self._waiting[bit]

    def _oldest(self, kind: Kind) -> Slot | None:
        q = self._queues[kind]
        while q and q[0].gone:
            q.popleft()
        return q[0] if q else None

    def _remove(self, slot: Slot) -> None:
        slot.gone = True
        del self._live[slot.id]
        q = self._queues[slot.entry.kind]
        while q and q[0].gone:
            q.popleft()
        if not self._live:
            for d in self._queues.values():
                d.clear()
            self._remove_all()

    def _count(self, reason: str, kind: Kind) -> None:
        key = f"{reason}.{kind.label}"
        self.dropped[key] = self.dropped.get(key, 0) + 1

    def _drop(self, slot: Slot, reason: str) -> None:
        self._count(reason, slot.entry.kind)
        if slot.owed != slot.full:  # a sink had it already: the drop is the others' only
            names = [name for name, bit in SINK_BITS.items() if slot.owed & bit]
            for name in names:
                self.partial[name] = self.partial.get(name, 0) + 1
            if not self._partial_said:
                log.warning(
                    "outbox memory queue full: dropping messages already delivered to some sinks, not to %s "
                    "(counted as dropped, reason %s)",
                    ", ".join(names),
                    reason,
                )
                self._partial_said = True
        self._book(slot.entry)
        self._remove(slot)

    def _book(self, entry: Entry) -> None:
        model = entry.opens[0] if entry.opens is not None else entry.closes[0] if entry.closes is not None else None
        if model is not None:
            prev = self.booked.get(model)
            if prev is None or entry.seq >= prev.seq:
                self.booked[model] = entry
        self.booked_seq = max(self.booked_seq, entry.seq)

    # ------------------------------------------------------------ the writer

    def drain(self, limit: int | None = None) -> list[Entry]:
        """Remove up to `limit` entries no sink holds (all when None), events first, each kind oldest first;
        each carries the sinks it is still owed to (`Entry.sinks`) when that is not all it was submitted for."""
        batch: list[Entry] = []
        for kind in Kind:
            kept: deque[Slot] = deque()
            for s in self._queues[kind]:
                if s.gone:
                    continue
                if s.held or (limit is not None and len(batch) >= limit):
                    kept.append(s)
                    continue
                batch.append(s.entry if s.owed == s.full else dataclasses.replace(s.entry, sinks=s.owed))
                s.gone = True
                del self._live[s.id]
            self._queues[kind] = kept
        if not self._live:
            self._remove_all()
        return batch

    def _remove_all(self) -> None:
        # nothing left: forget the lazily kept slots; a new episode of partial drops starts
        self._waiting.clear()
        self._partial_said = False

    def unshift(self, batch: Iterable[Entry]) -> None:
        """Put entries back in front, in their order (a write that failed), owed to the sinks they carry."""
        for e in reversed(list(batch)):
            self._append(e, front=True)

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

    def take(self, n: int, bit: int, *, run: int, now: float) -> list[Row]:
        """Up to n rows the sink (`bit`) still owes and does not hold, events first; held until ack or release."""
        out: list[Row] = []
        for kind, q in self._sink(bit).items():
            while q and len(out) < n:
                s = q.popleft()
                if s.gone or not s.owed & bit or s.held & bit:
                    continue
                s.held |= bit
                e = s.entry
                out.append(Row(s.id, e.topic, e.payload, kind, e.qos, now if e.created is None else e.created, run))
        return out

    def ack(self, ids: Iterable[int], bit: int, *, rejected: bool = False) -> int:
        """The sink delivered these rows (rejected: refused for good, counted as dropped); returns how many
        entries left memory (no sink owes them any more)."""
        n = 0
        for rid in ids:
            s = self._live.get(rid)
            if s is None or not s.held & bit:
                continue
            s.held &= ~bit
            s.owed &= ~bit
            if rejected:
                self._count("rejected", s.entry.kind)
            if not s.owed:
                self._book(s.entry)
                self._remove(s)
                n += 1
        return n

    def release(self, ids: Iterable[int] | None, bit: int) -> None:
        """Give the sink's rows back (None: all it holds): it takes them again first, in their order."""
        chosen = (
            [s for s in self._live.values() if s.held & bit]
            if ids is None
            else [s for s in (self._live.get(i) for i in ids) if s is not None and s.held & bit]
        )
        queues = self._sink(bit)
        for s in sorted(chosen, key=lambda s: s.id):  # newest first: each goes in front of the one before
            s.held &= ~bit
            queues[s.entry.kind].appendleft(s)

    def release_all(self) -> None:
        """Give back every row every sink holds (the writer stops)."""
        for bit in SINK_BITS.values():
            self.release(None, bit)
