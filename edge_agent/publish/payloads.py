"""Versioned JSON payloads for what the agent publishes."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from edge_agent.types import AnomalyEvent

EVENT_SCHEMA = "edge-agent/anomaly-event/v1"


def iso(ts: float) -> str:
    """UTC timestamp with milliseconds and a Z."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def event_payload(e: AnomalyEvent) -> dict[str, Any]:
    """The anomaly event as SCADA systems receive it (stable keys; JSON-safe numbers)."""
    return {
        "schema": EVENT_SCHEMA,
        "event_id": e.event_id,
        "type": e.type.value,
        "anomaly_id": e.anomaly_id,
        "seq": e.seq,
        "agent": e.agent,
        "site": e.site,
        "model": {"name": e.model, "version": e.model_version, "sha256": e.model_sha256},
        "window": {"start": iso(e.window_start), "end": iso(e.window_end)},
        "started_at": iso(e.started_at),
        "score": _num(e.score),
        "peak_score": _num(e.peak_score),
        "threshold": _num(e.threshold),
        "severity": e.severity.value,
        "contributions": [{"tag": k, "share": _num(v)} for k, v in e.contributions.items()],
        "values": {k: _num(v) for k, v in e.values.items()},
        "reason": e.reason or None,
        "historical": e.historical,
    }
