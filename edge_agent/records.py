"""The agent's records: versioned JSON for events, scores, telemetry and status, and their JSON Schemas.

One format for every stage after scoring: the outbox stores these bytes, the JSON sink publishes them as
they are, `outbox export` prints them, and scoring reads an open anomaly's start back from them at restart.
Plain data in, bytes out: this module imports no stage.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import typing
from collections.abc import Mapping
from importlib import resources
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.types import AnomalyEvent, EventType, FloatArray, Quality, Score, Severity, severity_of

EVENT_SCHEMA = "edge-agent/anomaly-event/v1"


def iso(ts: float) -> str:
    """UTC timestamp with milliseconds and a Z."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def event_payload(e: AnomalyEvent) -> dict[str, Any]:
    """The anomaly event as SCADA systems receive it (stable keys; JSON-safe numbers)."""
    payload: dict[str, Any] = {
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
    }
    if e.adaptation is not None:  # optional: only models with drift adaptation carry it
        payload["adaptation"] = {k: _num(v) if isinstance(v, float) else v for k, v in e.adaptation.items()}
    payload["historical"] = e.historical  # last: mark_historical swaps the payload's tail
    return payload


STATUS_SCHEMA = "edge-agent/status/v1"
SCORE_SCHEMA = "edge-agent/score/v1"
TELEMETRY_SCHEMA = "edge-agent/telemetry/v1"
SCHEMA_FILES = {"event": "event.json", "status": "status.json", "score": "score.json", "telemetry": "telemetry.json"}
_HISTORICAL_FALSE = b'"historical":false}'
_HISTORICAL_TRUE = b'"historical":true}'


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes, as published (keys in the builder's order, so `historical` stays last)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def mark_historical(payload: bytes) -> bytes:
    """The same payload with `historical: true` (a byte swap on the tail; a JSON round trip otherwise)."""
    if payload.endswith(_HISTORICAL_FALSE):
        return payload[: -len(_HISTORICAL_FALSE)] + _HISTORICAL_TRUE
    try:
        doc = json.loads(payload)
    except ValueError:
        return payload
    if isinstance(doc, dict) and "historical" in doc:
        doc["historical"] = True
        return encode(doc)
    return payload


def status_payload(
    state: str,
    *,
    agent: str,
    site: str,
    version: str,
    since: float,
    ts: float | None = None,
    outbox: Mapping[str, Any] | None = None,
    reason: str | None = None,
    config_sha256: str | None = None,
    models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Retained `{prefix}/status`: online with outbox depth and drop counters, or offline with a reason; what
    the agent runs (the config file's sha256 and each model's bundle sha256) when the publisher knows it."""
    out: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "state": state,
        "agent": agent,
        "site": site,
        "version": version,
        "since": iso(since),
    }
    if ts is not None:
        out["ts"] = iso(ts)
    if config_sha256:
        out["config_sha256"] = config_sha256
    if models is not None:
        out["models"] = dict(models)
    if outbox is not None:
        out["outbox"] = dict(outbox)
    if reason is not None:
        out["reason"] = reason
    return out


def score_payload(
    score: Score, *, agent: str, site: str, version: str | None = None, sha256: str | None = None
) -> dict[str, Any]:
    """`{prefix}/scores/{model}`: the latest score of a model against its threshold, and what it would rate."""
    model: dict[str, Any] = {"name": score.model}
    if version is not None:
        model["version"] = version
    if sha256 is not None:
        model["sha256"] = sha256
    ratio = score.score / score.threshold if score.score is not None and score.threshold > 0 else None
    return {
        "schema": SCORE_SCHEMA,
        "agent": agent,
        "site": site,
        "model": model,
        "ts": iso(score.t_end),
        "score": _num(score.score),
        "threshold": _num(score.threshold),
        "ratio": _num(ratio),
        # an event's severity is fixed by its peak; this is the current score's, so a rise is visible as it happens
        "severity": severity_of(ratio).value if ratio is not None and ratio > 1 else None,
        "good_fraction": _num(score.good_fraction),
        "contributions": [{"tag": k, "share": _num(v)} for k, v in score.contributions.items()],
        "historical": False,
    }


# kinds of value (SampleBatch.kinds) as codes for numpy columns
FLOAT, INT, BOOL, STR = 0, 1, 2, 3
KIND_CODES = {"float": FLOAT, "int": INT, "bool": BOOL, "str": STR}
# what follows a tag's value up to its time, by quality code: a lookup table instead of an enum per tag
_QUALITY_TEXT = np.array([f',"quality":"{q.label}","ts":"' for q in Quality], dtype=object)


def tag_prefix(name: str, unit: str | None) -> str:
    """The constant start of a tag's entry in telemetry, made once per tag: `{"name":"x","unit":"bar","value":`."""
    head = {"name": name} if unit is None else {"name": name, "unit": unit}
    return encode(head).decode()[:-1] + ',"value":'


def value_texts(
    values: FloatArray,
    good: npt.NDArray[np.bool_],
    kinds: npt.NDArray[np.uint8],
    float32: npt.NDArray[np.bool_],
    exact: npt.NDArray[np.object_],
) -> npt.NDArray[np.object_]:
    """Tag values as JSON text, in bulk by kind: null when not good or not finite; float32 tags as written
    (numpy's shortest float32 repr: 123.456, not 123.45600128173828); others as json prints them."""
    out = np.full(len(values), "null", dtype=object)
    has_exact = exact != None  # noqa: E711 (elementwise on an object array)
    ok = good & np.isfinite(values) & ~has_exact
    floats = ok & (kinds == FLOAT)
    short = floats & float32
    if short.any():
        with np.errstate(over="ignore"):
            narrow = values[short].astype(np.float32)
        fits = np.isfinite(narrow)  # a float32 tag holds float32 values; anything wider keeps float64's repr
        short[short] = fits
        out[short] = narrow[fits].astype(str).astype(object)
    wide = floats & ~short
    if wide.any():
        out[wide] = list(map(repr, values[wide].tolist()))  # float.__repr__: what json.dumps writes
    ints = ok & (kinds == INT)
    if ints.any():
        out[ints] = list(map(str, values[ints].astype(np.int64).tolist()))
    bools = ok & (kinds == BOOL)
    if bools.any():
        out[bools] = np.where(values[bools] != 0, "true", "false").astype(object)
    for i in np.flatnonzero(has_exact & good):
        v = exact[i]
        if not (isinstance(v, float) and not math.isfinite(v)):
            out[i] = json.dumps(v, ensure_ascii=False)
    return out


def time_tails(times: FloatArray) -> npt.NDArray[np.object_]:
    """Each tag's time as the end of its entry (`2026-…Z"}`), formatted once per distinct time, not per tag."""
    if not len(times) or (times == times[0]).all():
        return np.full(len(times), iso(float(times[0])) + '"}' if len(times) else "", dtype=object)
    distinct, where = np.unique(times, return_inverse=True)
    texts = np.array([iso(float(t)) + '"}' for t in distinct], dtype=object)
    return typing.cast(npt.NDArray[np.object_], texts[where])


def telemetry_record(
    device: str,
    *,
    agent: str,
    site: str,
    ts: float,
    prefixes: npt.NDArray[np.object_],
    values: npt.NDArray[np.object_],
    qualities: npt.NDArray[np.uint8],
    tails: npt.NDArray[np.object_],
) -> bytes:
    """`{prefix}/telemetry/{device}`: tags with value, quality and time (and unit when configured), as the JSON
    bytes `encode` would make of the same record, joined from per-tag pieces (no dict per tag)."""
    head = encode({"schema": TELEMETRY_SCHEMA, "agent": agent, "site": site, "device": device, "ts": iso(ts)}).decode()
    items = map("".join, zip(prefixes, values, _QUALITY_TEXT[qualities], tails, strict=True))
    return f'{head[:-1]},"tags":[{",".join(items)}],"historical":false}}'.encode()


def load_schema(name: str) -> dict[str, Any]:
    """A shipped JSON Schema by name: event, status, score or telemetry."""
    text = resources.files("edge_agent").joinpath("schemas", SCHEMA_FILES[name]).read_text(encoding="utf-8")
    return typing.cast(dict[str, Any], json.loads(text))


def _seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def decode_event(record: bytes) -> AnomalyEvent:
    """An event back from its record (timestamps to the millisecond); ValueError/KeyError/TypeError if damaged."""
    d = json.loads(record)
    return AnomalyEvent(
        type=EventType(d["type"]),
        event_id=d["event_id"],
        anomaly_id=d["anomaly_id"],
        seq=int(d["seq"]),
        agent=d["agent"],
        site=d["site"],
        model=d["model"]["name"],
        model_version=d["model"]["version"],
        model_sha256=d["model"]["sha256"],
        window_start=_seconds(d["window"]["start"]),
        window_end=_seconds(d["window"]["end"]),
        score=float(d["score"] if d["score"] is not None else math.nan),
        threshold=float(d["threshold"] if d["threshold"] is not None else math.nan),
        severity=Severity(d["severity"]),
        contributions={c["tag"]: c["share"] for c in d["contributions"]},
        values=dict(d["values"]),
        started_at=_seconds(d["started_at"]),
        peak_score=float(d["peak_score"] if d["peak_score"] is not None else math.nan),
        reason=d["reason"] or "",
        adaptation=d.get("adaptation"),
    )
