"""The host side of Sparkplug B for one edge node: births, aliases, seq and deaths turned into tag updates.

Plain logic over decoded payloads (the agent's protobuf classes, `edge_agent.sparkplug.proto`); no MQTT here.
The rules followed (Sparkplug 3.0, chapter 7 "host applications"): NBIRTH starts a node session (seq 0, a
`bdSeq`), its devices' DBIRTHs follow; every later message of the node (NDATA, DBIRTH, DDATA, DDEATH) carries
the next seq (0–255, wrapping); DATA may name metrics by the alias their birth gave; NDEATH (the node's will,
same bdSeq as its birth) ends the node and all its devices, DDEATH one device. A death whose bdSeq is not the
current birth's is an old session's will, delivered late: it is ignored. When this host cannot trust what it
holds (data before any birth it saw, a seq gap, an alias no birth defined) it says why, and the driver asks the
node for a rebirth (NCMD `Node Control/Rebirth`) if configured to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from edge_agent.drivers.mqtt.config import SparkplugSource
from edge_agent.sparkplug import BDSEQ, MessageType, Topic
from edge_agent.sparkplug.datatypes import SIGNED_BITS, DataType
from edge_agent.sparkplug.proto import Payload

_SIGNED_BITS = {int(k): bits for k, bits in SIGNED_BITS.items()}
_SCALARS = {"int_value", "long_value", "float_value", "double_value", "boolean_value", "string_value"}


class Malformed(ValueError):
    """A Sparkplug payload that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A metric value of a kind a tag cannot hold (bytes, a DataSet, a Template): the tag goes bad."""

    field: str


@dataclass
class Outcome:
    """What one message means for the tags: new values by metric name, or that they all died."""

    values: dict[str, Any] = field(default_factory=dict)  # None: the metric is null
    dead: bool = False  # the node or device is gone: every tag of the scope is comms-lost
    rebirth: str | None = None  # why what this host holds cannot be trusted (a rebirth would fix it)
    historical: int = 0  # metrics skipped because they were marked is_historical
    note: str | None = None  # something worth one log line (a late will ignored)


def metric_value(metric: Any, datatype: int | None) -> Any:
    """A metric's value as Python (None when null): signed types read back negative, whatever their width.

    Publishers differ in how a negative Int8/Int16 goes into the uint32 field: Eclipse Tahu's Java library
    (and so Ignition) sign-extends to 32 bits, its Python library wraps at the type's width. Masking to the
    width first reads both the same.
    """
    if metric.HasField("is_null") and metric.is_null:
        return None
    name = metric.WhichOneof("value")
    if name is None:
        return None
    if name not in _SCALARS:
        return Unsupported(name)
    value = getattr(metric, name)
    bits = _SIGNED_BITS.get(datatype) if datatype is not None else None
    if bits is not None and name in ("int_value", "long_value"):
        value &= (1 << bits) - 1
        if value >> (bits - 1):
            value -= 1 << bits
    return value


class NodeWatch:
    """What this host knows of one edge node (and the device its tags belong to, if any)."""

    def __init__(self, source: SparkplugSource, metrics: Iterable[str]) -> None:
        self.source = source
        self.wanted = frozenset(metrics)
        self.bdseq: int | None = None
        self.next_seq: int | None = None  # None: no birth seen in this session
        self.node_born = False
        self.scope_born = False  # the node (node metrics) or the device (device metrics) has a current birth
        self.aliases: dict[int, str] = {}
        self.types: dict[str, int] = {}

    def _ours(self, topic: Topic) -> bool:
        return topic.device == self.source.device_id

    def on_message(self, topic: Topic, data: bytes) -> Outcome:
        """Apply one message of this node; Malformed when its payload cannot be decoded."""
        if topic.type in (MessageType.NCMD, MessageType.DCMD, MessageType.STATE):
            return Outcome()
        try:
            payload = Payload.FromString(data)
        except (DecodeError, ValueError) as exc:
            raise Malformed(f"not a Sparkplug B payload ({exc})") from None
        if topic.type is MessageType.NBIRTH:
            return self._node_birth(payload)
        if topic.type is MessageType.NDEATH:
            return self._node_death(payload)
        out = Outcome(rebirth=self._sequence(payload))
        if not self._ours(topic):
            return out
        if topic.type in (MessageType.DBIRTH,):
            self.scope_born = True
            self._learn(payload.metrics)
            self._values(payload.metrics, out)
        elif topic.type is MessageType.DDEATH:
            self.scope_born = False
            out.dead = True
        elif topic.type in (MessageType.NDATA, MessageType.DDATA):
            if not self.scope_born and out.rebirth is None:
                out.rebirth = f"{topic.type} before the {'DBIRTH' if topic.device else 'NBIRTH'} of its session"
            self._values(payload.metrics, out)
        return out

    def _sequence(self, payload: Any) -> str | None:
        """Check the message's seq against the one expected; why not, or None."""
        if not payload.HasField("seq"):
            return None
        seq = payload.seq % 256
        expected, self.next_seq = self.next_seq, (seq + 1) % 256
        if expected is None:
            return "data from a node whose NBIRTH this agent did not see"
        if seq != expected:
            return f"seq {seq} where {expected} was next (messages lost)"
        return None

    def _node_birth(self, payload: Any) -> Outcome:
        self.bdseq = _bdseq(payload)
        self.next_seq = (payload.seq + 1) % 256 if payload.HasField("seq") else None
        self.node_born = True
        self.scope_born = self.source.device_id is None
        self.aliases.clear()
        self.types.clear()
        out = Outcome()
        if self.source.device_id is None:
            self._learn(payload.metrics)
            self._values(payload.metrics, out)
        return out

    def _node_death(self, payload: Any) -> Outcome:
        bdseq = _bdseq(payload)
        if self.bdseq is not None and bdseq is not None and bdseq != self.bdseq:
            return Outcome(note=f"NDEATH with bdSeq {bdseq} ignored: the node's current birth has bdSeq {self.bdseq}")
        self.node_born = self.scope_born = False
        self.next_seq = None
        return Outcome(dead=True)

    def _learn(self, metrics: Iterable[Any]) -> None:
        """A birth's names, aliases and datatypes (a new birth replaces the old ones)."""
        self.aliases.clear()
        self.types.clear()
        for m in metrics:
            if not m.name:
                continue
            if m.HasField("alias"):
                self.aliases[m.alias] = m.name
            if m.HasField("datatype"):
                self.types[m.name] = m.datatype

    def _values(self, metrics: Iterable[Any], out: Outcome) -> None:
        for m in metrics:
            name = m.name if m.name else self.aliases.get(m.alias) if m.HasField("alias") else None
            if name is None:
                if out.rebirth is None:
                    out.rebirth = f"alias {m.alias} that no birth this agent saw defined"
                continue
            if name not in self.wanted:
                continue
            if m.is_historical:
                out.historical += 1  # store-and-forward data from the past: not a current value
                continue
            datatype = m.datatype if m.HasField("datatype") else self.types.get(name)
            out.values[name] = metric_value(m, datatype)


def _bdseq(payload: Any) -> int | None:
    for m in payload.metrics:
        if m.name == BDSEQ:
            value = metric_value(m, m.datatype if m.HasField("datatype") else DataType.UINT64)
            return int(value) if isinstance(value, int) else None
    return None
