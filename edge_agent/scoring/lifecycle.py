"""The anomaly lifecycle across restarts: the per-agent event sequence, and ends for anomalies left open.

Scoring owns it; the agent reads what the outbox remembers (the last sequence number, the start records
of anomalies that never got their end) and hands it over here as plain data at startup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from edge_agent.records import decode_event
from edge_agent.scoring.detector import new_event_id
from edge_agent.types import AnomalyEvent, EventType, OpenAnomaly

log = logging.getLogger("edge_agent.scoring")


class EventSequence:
    """The per-agent event sequence; restarts continue after the highest number already written."""

    def __init__(self, start_after: int = 0) -> None:
        self._next = start_after + 1

    def __iter__(self) -> EventSequence:
        return self

    def __next__(self) -> int:
        n = self._next
        self._next += 1
        return n

    def start_after(self, last: int) -> None:
        """Continue after `last` (set before the first event of this run)."""
        self._next = max(self._next, last + 1)


def restart_end(start: AnomalyEvent, *, t: float, seq: int, reason: str = "agent_restart") -> AnomalyEvent:
    """The anomaly.end that closes an anomaly left open by an agent that died (window ends at restart)."""
    return dataclasses.replace(
        start,
        type=EventType.END,
        event_id=new_event_id(t, seq),
        seq=seq,
        window_end=max(t, start.window_end),
        score=start.peak_score,
        values={},
        reason=reason,
        historical=False,
    )


def close_left_open(open_anomalies: Iterable[OpenAnomaly], sequence: EventSequence, *, t: float) -> list[AnomalyEvent]:
    """An anomaly.end (reason agent_restart) for each anomaly a previous run left open; damaged records stay open."""
    ends = []
    for item in open_anomalies:
        try:
            start = decode_event(item.record)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("outbox: cannot read open anomaly %s (%s); it stays open", item.anomaly_id, exc)
            continue
        log.warning(
            "model %s: anomaly %s was open when the agent stopped; closing it (reason agent_restart)",
            start.model,
            start.anomaly_id,
        )
        ends.append(restart_end(start, t=t, seq=next(sequence)))
    return ends
