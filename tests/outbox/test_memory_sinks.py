"""The memory queue serves every sink (MemoryQueue per-sink semantics): each entry is owed to the sinks configured
when it was submitted, taken, acknowledged and given back per sink; what is left is drained with the bits still owed."""

from __future__ import annotations

import logging

import pytest

from edge_agent.config import WhenFull
from edge_agent.outbox.memory import MemoryQueue
from edge_agent.outbox.rows import SINK_BITS, Entry, Kind, Row

JSON, SPB = SINK_BITS["json"], SINK_BITS["sparkplug"]
BOTH = JSON | SPB


def queue(n: int, limit: int = 100, when_full: WhenFull = WhenFull.DROP_OLDEST) -> MemoryQueue:
    q = MemoryQueue(limit, when_full, BOTH)
    for i in range(n):
        q.add(Entry(f"t/{i}", f"m{i}".encode(), Kind.TELEMETRY, created=float(i)))
    return q


def payloads(rows: list[Row]) -> list[bytes]:
    return [r.payload for r in rows]


def test_each_sink_takes_every_entry_once() -> None:
    q = queue(5)
    a = q.take(10, JSON, run=1, now=0.0)
    b = q.take(10, SPB, run=1, now=0.0)
    assert payloads(a) == payloads(b) == [f"m{i}".encode() for i in range(5)]
    assert [r.id for r in a] == [r.id for r in b] and all(r.id < 0 for r in a)
    assert q.take(10, JSON, run=1, now=0.0) == [] and q.take(10, SPB, run=1, now=0.0) == []  # held: not again


def test_an_entry_leaves_memory_when_every_sink_acked() -> None:
    q = queue(3)
    a = q.take(10, JSON, run=1, now=0.0)
    assert q.ack([r.id for r in a], JSON) == 0  # sparkplug still owes them
    assert len(q) == 3
    b = q.take(10, SPB, run=1, now=0.0)
    assert q.ack([r.id for r in b[:2]], SPB) == 2
    assert len(q) == 1
    assert q.ack([b[0].id], SPB) == 0  # twice: unknown
    assert q.ack([b[2].id], JSON) == 0  # json acked it already (not held by json)
    assert q.ack([b[2].id], SPB) == 1 and len(q) == 0


def test_release_gives_back_to_that_sink_only_in_order() -> None:
    q = queue(4)
    a = q.take(3, JSON, run=1, now=0.0)
    q.take(4, SPB, run=1, now=0.0)
    q.release([a[2].id, a[0].id], JSON)
    again = q.take(10, JSON, run=1, now=0.0)
    assert payloads(again) == [b"m0", b"m2", b"m3"]
    assert q.take(10, SPB, run=1, now=0.0) == []  # sparkplug still holds all four
    q.release(None, SPB)
    assert payloads(q.take(10, SPB, run=1, now=0.0)) == [b"m0", b"m1", b"m2", b"m3"]


def test_drain_writes_what_is_still_owed_with_exactly_those_bits() -> None:
    q = queue(4)
    a = q.take(2, JSON, run=1, now=0.0)
    q.ack([r.id for r in a], JSON)  # m0, m1 delivered to json
    held = q.take(1, SPB, run=1, now=0.0)  # m0 held by sparkplug: stays in memory
    batch = q.drain()
    assert [(e.payload, e.sinks) for e in batch] == [(b"m1", SPB), (b"m2", 0), (b"m3", 0)]  # 0: all targets
    assert len(q) == 1
    q.unshift(batch)  # the write failed: back in front, owing what they carried
    assert len(q) == 4
    assert payloads(q.take(10, JSON, run=1, now=0.0)) == [b"m2", b"m3"]  # json is not owed m1 again
    assert payloads(q.take(10, SPB, run=1, now=0.0)) == [b"m1", b"m2", b"m3"]
    assert q.ack([held[0].id], SPB) == 1


def test_a_sink_configured_later_is_not_owed_older_entries() -> None:
    q = MemoryQueue(10, WhenFull.DROP_OLDEST, JSON)
    q.add(Entry("t", b"old"))
    q.targets = BOTH
    q.add(Entry("t", b"new"))
    assert payloads(q.take(10, SPB, run=1, now=0.0)) == [b"new"]
    assert payloads(q.take(10, JSON, run=1, now=0.0)) == [b"old", b"new"]


def test_the_bound_counts_drops_and_those_one_sink_had_per_sink(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.outbox")
    q = queue(3, limit=3)
    a = q.take(3, JSON, run=1, now=0.0)
    q.ack([r.id for r in a], JSON)
    for i in range(3, 6):  # three more: the three oldest (json had them) go
        assert q.add(Entry(f"t/{i}", f"m{i}".encode(), Kind.TELEMETRY)) == 1
    assert q.dropped == {"memory.telemetry": 3}
    assert q.partial == {"sparkplug": 3}
    assert len([r for r in caplog.records if "not to sparkplug" in r.getMessage()]) == 1  # once per episode
    assert payloads(q.take(10, SPB, run=1, now=0.0)) == [b"m3", b"m4", b"m5"]
    assert payloads(q.take(10, JSON, run=1, now=0.0)) == [b"m3", b"m4", b"m5"]


def test_drop_newest_refuses_and_an_event_displaces_telemetry() -> None:
    q = queue(2, limit=2, when_full=WhenFull.DROP_NEWEST)
    assert q.add(Entry("t/x", b"x", Kind.TELEMETRY)) == 1
    assert q.add(Entry("e", b"ev", Kind.EVENT)) == 1
    assert q.dropped == {"memory.telemetry": 2}
    assert payloads(q.take(10, JSON, run=1, now=0.0)) == [b"ev", b"m1"]


def test_rejected_is_counted_and_clears_that_sink_only() -> None:
    q = queue(1)
    a = q.take(1, SPB, run=1, now=0.0)
    assert q.ack([a[0].id], SPB, rejected=True) == 0
    assert q.dropped == {"rejected.telemetry": 1}
    assert payloads(q.take(1, JSON, run=1, now=0.0)) == [b"m0"]


def test_a_sink_that_never_takes_keeps_memory_bounded() -> None:
    q = MemoryQueue(10, WhenFull.DROP_OLDEST, BOTH)
    for i in range(5000):  # sparkplug never takes; json takes and acks everything
        q.add(Entry("t", str(i).encode(), Kind.TELEMETRY))
        q.ack([r.id for r in q.take(10, JSON, run=1, now=0.0)], JSON)
    assert len(q) == 10 and q.dropped == {"memory.telemetry": 4990} and q.partial == {"sparkplug": 4990}
    assert all(len(d) <= 2 * 10 + 65 for d in (*q._queues.values(), *q._sink(SPB).values(), *q._sink(JSON).values()))
    assert payloads(q.take(100, SPB, run=1, now=0.0)) == [str(i).encode() for i in range(4990, 5000)]
