"""The edge node's Sparkplug state as plain data: aliases, seq, last values, devices alive; outbox rows to messages.

No I/O and no MQTT here (the sink, `sink.py`, owns the connection): this turns the agent's JSON records
(telemetry, events, scores, as the outbox stores them) into Sparkplug B messages, so it is tested alone.

- Aliases: every metric of the node and its devices gets one at construction (1, 2, … in birth order,
  unique across the node); births carry name and alias, NDATA/DDATA only the alias.
- seq: 0 on NBIRTH, then +1 (wrapping 255 → 0) on every other message of the node (NDATA, DBIRTH,
  DDATA, DDEATH); NDEATH carries none.
- Devices: no DBIRTH before the device's first telemetry record (a birth with every value null would make a
  host show nulls until the first data): that record is the DBIRTH, with its values (and a DDEATH after it
  when every tag is comms-lost). Comms-lost on every tag of a later record → DDEATH (once); the next record
  with any other quality → DBIRTH with the values. Quality from telemetry, not a callback from the agent: telemetry is
  what the outbox keeps in order, so deaths and births replay in their place during store and forward.
- Values: a tag whose quality is not good is sent as is_null; telemetry is parsed generically (a record
  may carry every tag or only those that changed, with or without `unit`): only changed values go in DDATA.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from edge_agent.outbox import Kind, Row
from edge_agent.sparkplug import BDSEQ, REBIRTH, DataType, MessageType, device_topic, from_tag_type, node_topic, proto

# anomaly metrics per model, on the node: what an engineer attaches Ignition alarms to
MODEL_METRICS: tuple[tuple[str, DataType], ...] = (
    ("score", DataType.DOUBLE),
    ("threshold", DataType.DOUBLE),
    ("active", DataType.BOOLEAN),
    ("severity", DataType.STRING),
    ("last_event_id", DataType.STRING),
    ("top_tags", DataType.STRING),
)
UNIT = "engUnit"  # property keys Ignition's MQTT Engine maps onto tag properties
DESCRIPTION = "description"


@dataclass(frozen=True, slots=True)
class BirthTag:
    """A tag as DBIRTH announces it."""

    name: str
    datatype: DataType
    unit: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class BirthDevice:
    """A configured device and its tags, handed to the sink by the agent at construction."""

    name: str
    tags: tuple[BirthTag, ...]


def devices_from_config(devices: Iterable[Any]) -> list[BirthDevice]:
    """BirthDevices from validated device sections (a tag's type, unit and description; scaled integers are
    doubles, since scale and offset make them fractional)."""
    out = []
    for dev in devices:
        tags = []
        for tag in dev.tags:
            dtype = getattr(tag, "dtype", None)
            datatype = from_tag_type(str(getattr(dtype, "type", dtype)) if dtype is not None else None)
            scaled = getattr(tag, "scale", 1.0) != 1.0 or getattr(tag, "offset", 0.0) != 0.0
            if scaled and datatype not in (DataType.FLOAT, DataType.DOUBLE, DataType.BOOLEAN, DataType.STRING):
                datatype = DataType.DOUBLE
            tags.append(BirthTag(tag.name, datatype, tag.unit, tag.description))
        out.append(BirthDevice(dev.name, tuple(tags)))
    return out


class Message(NamedTuple):
    """One Sparkplug message to publish (QoS 0, not retained, as the specification has data and births)."""

    topic: str
    payload: bytes
    type: MessageType


def ms(ts: float) -> int:
    """Epoch seconds to Sparkplug's epoch milliseconds."""
    return round(ts * 1000)


def _iso_ms(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return ms(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


class _Metric:
    __slots__ = ("alias", "datatype", "name", "props", "value")

    def __init__(self, name: str, alias: int, datatype: DataType, props: dict[str, Any] | None = None) -> None:
        self.name, self.alias, self.datatype = name, alias, datatype
        self.props = props
        self.value: Any = None


class EdgeNode:
    """One Sparkplug edge node: its metrics, aliases, seq and device state; builds every message it sends."""

    def __init__(self, group: str, node: str, devices: Sequence[BirthDevice], models: Sequence[str]) -> None:
        self.group, self.node = group, node
        self._alias = 0
        self.node_metrics: dict[str, _Metric] = {}
        self._add(self.node_metrics, REBIRTH, DataType.BOOLEAN).value = False
        for model in models:
            for name, datatype in MODEL_METRICS:
                self._add(self.node_metrics, f"Models/{model}/{name}", datatype)
        self.devices: dict[str, dict[str, _Metric]] = {}
        for dev in devices:
            metrics: dict[str, _Metric] = {}
            for tag in dev.tags:
                props = {}
                if tag.unit:
                    props[UNIT] = (DataType.STRING, tag.unit)
                if tag.description:
                    props[DESCRIPTION] = (DataType.STRING, tag.description)
                self._add(metrics, tag.name, tag.datatype, props or None)
            self.devices[dev.name] = metrics
        self.alive = dict.fromkeys(self.devices, True)
        self.known = dict.fromkeys(self.devices, False)  # a telemetry record gave the values: births include it
        self.seq = 0
        self.skipped = 0  # records about devices or models this node did not announce (a reload added them)

    def _add(
        self, into: dict[str, _Metric], name: str, datatype: DataType, props: dict[str, Any] | None = None
    ) -> _Metric:
        self._alias += 1
        metric = into[name] = _Metric(name, self._alias, datatype, props)
        return metric

    # ------------------------------------------------------------ births and deaths

    def death(self, bdseq: int, now: float) -> bytes:
        """The NDEATH payload (the MQTT will): bdSeq only, no seq."""
        payload = proto.Payload(timestamp=ms(now))
        self._bdseq(payload, bdseq)
        return bytes(payload.SerializeToString())

    def births(self, bdseq: int, now: float) -> list[Message]:
        """NBIRTH (seq 0, bdSeq, Node Control/Rebirth false, the model metrics), then DBIRTH per device whose
        values a telemetry record gave (and DDEATH after it for a device known to be comms-lost)."""
        self.seq = 0
        payload = proto.Payload(timestamp=ms(now), seq=0)
        self._bdseq(payload, bdseq)
        for metric in self.node_metrics.values():
            self._full(payload, metric)
        out = [
            Message(
                node_topic(self.group, MessageType.NBIRTH, self.node),
                bytes(payload.SerializeToString()),
                MessageType.NBIRTH,
            )
        ]
        for device in self.devices:
            if not self.known[device]:
                continue  # born by its first telemetry record, with values
            out.append(self._device_birth(device, ms(now)))
            if not self.alive[device]:
                out.append(self._device_death(device, ms(now)))
        return out

    def _bdseq(self, payload: Any, bdseq: int) -> None:
        m = payload.metrics.add(name=BDSEQ, datatype=DataType.INT64, timestamp=payload.timestamp)
        proto.set_value(m, DataType.INT64, bdseq)

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _full(self, payload: Any, metric: _Metric, ts: int | None = None) -> None:
        m = payload.metrics.add(name=metric.name, alias=metric.alias, datatype=int(metric.datatype))
        if ts is not None:
            m.timestamp = ts
        if metric.props:
            m.properties.CopyFrom(proto.property_set(metric.props))
        proto.set_value(m, metric.datatype, metric.value)

    def _device_birth(self, device: str, ts: int) -> Message:
        payload = proto.Payload(timestamp=ts, seq=self._next_seq())
        for metric in self.devices[device].values():
            self._full(payload, metric)
        topic = device_topic(self.group, MessageType.DBIRTH, self.node, device)
        return Message(topic, bytes(payload.SerializeToString()), MessageType.DBIRTH)

    def _device_death(self, device: str, ts: int) -> Message:
        payload = proto.Payload(timestamp=ts, seq=self._next_seq())
        topic = device_topic(self.group, MessageType.DDEATH, self.node, device)
        return Message(topic, bytes(payload.SerializeToString()), MessageType.DDEATH)

    # ------------------------------------------------------------ rows to data

    def from_row(self, row: Row, historical: bool) -> list[Message]:
        """The messages an outbox row makes (none when nothing changed or it is about something not announced)."""
        try:
            record = json.loads(row.payload)
        except ValueError:
            self.skipped += 1
            return []
        if not isinstance(record, dict):
            self.skipped += 1
            return []
        if row.kind is Kind.TELEMETRY:
            return self._telemetry(record, historical)
        return self._model(record, historical, event=row.kind is Kind.EVENT)

    def _telemetry(self, record: Mapping[str, Any], historical: bool) -> list[Message]:
        device = record.get("device")
        metrics = self.devices.get(device) if isinstance(device, str) else None
        tags = record.get("tags")
        if metrics is None or not isinstance(tags, list):
            self.skipped += 1
            return []
        assert isinstance(device, str)
        ts = _iso_ms(record.get("ts")) or 0
        items = [t for t in tags if isinstance(t, dict) and t.get("name") in metrics]
        first = not self.known[device]
        if first and not items:
            return []  # nothing about the announced tags yet: the DBIRTH waits for values
        if items and all(t.get("quality") == "comms-lost" for t in items):
            if not self.alive[device] and not first:
                return []
            self.alive[device] = False
            for t in items:
                metrics[t["name"]].value = None
            if first:  # a host must know the tags to mark them stale: birth (nulls), then death
                self.known[device] = True
                return [self._device_birth(device, ts), self._device_death(device, ts)]
            return [self._device_death(device, ts)]
        changed: list[tuple[_Metric, Any, int]] = []
        for t in items:
            metric = metrics[t["name"]]
            value = t.get("value") if t.get("quality") == "good" else None
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            if value != metric.value or type(value) is not type(metric.value):
                metric.value = value
                changed.append((metric, value, _iso_ms(t.get("ts")) or ts))
        if first or not self.alive[device]:
            self.known[device] = self.alive[device] = True
            return [self._device_birth(device, ts)]
        if not changed:
            return []
        payload = proto.Payload(timestamp=ts, seq=self._next_seq())
        for metric, value, at in changed:
            m = payload.metrics.add(alias=metric.alias, timestamp=at)
            if historical:
                m.is_historical = True
            proto.set_value(m, metric.datatype, value)
        topic = device_topic(self.group, MessageType.DDATA, self.node, device)
        return [Message(topic, bytes(payload.SerializeToString()), MessageType.DDATA)]

    def _model(self, record: Mapping[str, Any], historical: bool, *, event: bool) -> list[Message]:
        model = record.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        prefix = f"Models/{name}/"
        if not isinstance(name, str) or prefix + "score" not in self.node_metrics:
            self.skipped += 1
            return []
        contributions = record.get("contributions") or []
        top = ",".join(str(c.get("tag")) for c in contributions[:3] if isinstance(c, dict))
        values: dict[str, Any] = {"score": record.get("score"), "threshold": record.get("threshold")}
        if event:
            values["active"] = record.get("type") == "anomaly.start"
            values["severity"] = record.get("severity")
            values["last_event_id"] = record.get("event_id")
            values["top_tags"] = top
        ts = _iso_ms(record.get("window", {}).get("end") if event else record.get("ts")) or 0
        payload = proto.Payload(timestamp=ts)
        for key, value in values.items():
            metric = self.node_metrics[prefix + key]
            if value == metric.value and type(value) is type(metric.value):
                continue
            metric.value = value
            m = payload.metrics.add(alias=metric.alias, timestamp=ts)
            if historical:
                m.is_historical = True
            proto.set_value(m, metric.datatype, value)
        if not payload.metrics:
            return []
        payload.seq = self._next_seq()
        return [
            Message(
                node_topic(self.group, MessageType.NDATA, self.node),
                bytes(payload.SerializeToString()),
                MessageType.NDATA,
            )
        ]

    def rebirth_requested(self, raw: bytes) -> bool:
        """An NCMD payload asks for a rebirth (`Node Control/Rebirth` true, by name or by its alias)."""
        try:
            payload = proto.Payload.FromString(raw)
        except DecodeError:  # a malformed command is ignored
            return False
        alias = self.node_metrics[REBIRTH].alias
        return any(
            (m.name == REBIRTH or (not m.name and m.alias == alias))
            and m.WhichOneof("value") == "boolean_value"
            and m.boolean_value
            for m in payload.metrics
        )
