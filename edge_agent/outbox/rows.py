"""What the outbox stores and hands out: message kinds, entries, rows, stats, and its error."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from edge_agent.errors import EdgeAgentError
from edge_agent.types import OpenAnomaly

ROW_OVERHEAD = 48  # bytes counted per row beyond payload and topic (row header, index entry)


class OutboxError(EdgeAgentError):
    """The outbox cannot be used (directory not writable, disk full, another process holds it)."""


class OutboxBusy(OutboxError):
    """Another process (an agent or a drain) holds the outbox: a second publisher would send every row twice."""


class Kind(IntEnum):
    """What a message is; lower values are published first and dropped last."""

    EVENT = 0
    SCORE = 1
    TELEMETRY = 2

    @property
    def label(self) -> str:
        """Lower-case name used in counters and JSON."""
        return self.name.lower()


# the sinks a stored row waits for, one bit each (the `pending` column): a row is deleted when none is left
SINK_BITS: dict[str, int] = {"json": 1, "sparkplug": 2}


def sink_mask(names: Iterable[str]) -> int:
    """The bits of the named sinks (mqtt.payloads)."""
    mask = 0
    for name in names:
        mask |= SINK_BITS[name]
    return mask or 1


# bounds reached, too old, the in-memory queue overflowed (the disk did not keep up, or is full), refused for
# good by the broker (MQTT 5), damaged on disk (failed its checksum, or lost with a damaged file)
DROP_REASONS = ("full", "age", "memory", "rejected", "corrupt")


@dataclass(frozen=True, slots=True)
class Entry:
    """A message to store: where it goes and the bytes, plus bookkeeping for open anomalies."""

    topic: str
    payload: bytes
    kind: Kind = Kind.EVENT
    qos: int = 1
    created: float | None = None  # None: the time of the put
    seq: int = 0  # the event's per-agent sequence number; the highest one is remembered across restarts
    opens: tuple[str, str, bytes] | None = None  # (model, anomaly_id, record): one open anomaly per model
    closes: tuple[str, str] | None = None  # (model, anomaly_id) this event ends
    sinks: int = 0  # the sinks it is owed to (SINK_BITS; from the memory queue); 0: the outbox's targets

    @property
    def size(self) -> int:
        """Bytes this message counts against max_bytes."""
        return len(self.payload) + len(self.topic) + ROW_OVERHEAD


class Row(NamedTuple):
    """A stored message handed out by `take` (a named tuple: replay builds thousands per second)."""

    id: int
    topic: str
    payload: bytes
    kind: Kind
    qos: int
    created: float
    run: int  # the outbox run (agent start) that wrote it; older runs mean delivered after a restart


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Depth, size, age and drop counters of an outbox."""

    path: str
    depth: Mapping[str, int]  # per kind
    bytes: int
    max_bytes: int
    max_age: float
    when_full: str
    oldest: float | None  # creation time of the oldest stored message
    in_flight: int
    dropped: Mapping[str, int]  # "<reason>.<kind>" → count, persisted
    open_anomalies: int
    runs: int
    corrupt_files: int
    lost_transactions: int  # committed transactions lost with damaged files (their rows are counted when known)
    last_seq: int

    @property
    def total(self) -> int:
        """Messages stored."""
        return sum(self.depth.values())

    def dropped_by_kind(self) -> dict[str, int]:
        """Drops summed over reasons, per kind."""
        return {k.label: sum(self.dropped.get(f"{r}.{k.label}", 0) for r in DROP_REASONS) for k in Kind}

    def dropped_by_reason(self) -> dict[str, int]:
        """Drops summed over kinds, per reason."""
        return {r: sum(self.dropped.get(f"{r}.{k.label}", 0) for k in Kind) for r in DROP_REASONS}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for `outbox stats --json` and the status topic)."""
        return {
            "path": self.path,
            "depth": self.total,
            "depth_by_kind": dict(self.depth),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "max_age": self.max_age,
            "when_full": self.when_full,
            "oldest": iso(self.oldest) if self.oldest is not None else None,
            "in_flight": self.in_flight,
            "dropped": self.dropped_by_kind(),
            "dropped_by_reason": self.dropped_by_reason(),
            "open_anomalies": self.open_anomalies,
            "runs": self.runs,
            "corrupt_files": self.corrupt_files,
            "lost_transactions": self.lost_transactions,
            "last_seq": self.last_seq,
        }


def iso(ts: float) -> str:
    """UTC timestamp with milliseconds and a Z."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def counter_names() -> list[str]:
    """Every drop counter: `<reason>.<kind>`."""
    return [f"{r}.{k.label}" for r in DROP_REASONS for k in Kind]


@dataclass(frozen=True, slots=True)
class StartState:
    """What the outbox remembers from earlier runs, handed to scoring at startup as plain data."""

    last_seq: int  # the highest event sequence number ever written
    open_anomalies: list[OpenAnomaly]  # starts whose end was never written (the agent died in between)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of the outbox stage: what producers submitted, what waits in memory, and the file's stats."""

    submitted: int
    pending: int  # messages in memory (waiting for the file, or handed to a sink from there)
    dropped_memory: int  # memory drops not yet written into the file's counters
    dropped: Mapping[str, int]  # "<reason>.<kind>" → count: the file's counters plus those waiting in memory
    store_error: str | None  # why the file is not being written (None: it is)
    oldest: float | None  # creation time of the oldest stored message (refreshed by housekeeping)
    outbox: OutboxStats | None  # None while the file is not open
