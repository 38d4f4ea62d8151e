"""Sparkplug B 3.0: the payload schema, data types and topics, as plain building blocks (a base layer).

Used by the Sparkplug sink (`publish/sparkplug.py`) and the MQTT input driver; imports only protobuf.

API:
- `proto`: the message classes `Payload`, `Metric`, `PropertySet`, `PropertyValue`, `MetaData`, `DataSet`,
  `Template` (protobuf messages: `Payload.FromString(b)`, `p.SerializeToString()`), `set_value(msg, datatype,
  value)` / `get_value(msg, datatype=None)` for the oneof value of a Metric or PropertyValue (signed types
  as two's complement, None as is_null), `property_set({key: (datatype, value)})`, `properties_dict(ps)`.
- `datatypes`: `DataType` (the specification's numbers), `from_tag_type("float32" | "REAL" | None)`,
  `VALUE_FIELD` (datatype → the oneof field that holds it).
- `topics`: `NAMESPACE`, `MessageType`, `node_topic(group, type, node)`, `device_topic(group, type, node,
  device)`, `state_topic(host)`, `parse_topic(topic) -> Topic | None`, `state_payload(online, ts_ms)`,
  `parse_state(bytes) -> (online, ts_ms) | None`.
- well-known metric names: `BDSEQ` ("bdSeq"), `REBIRTH` ("Node Control/Rebirth").
"""

from __future__ import annotations

from edge_agent.sparkplug.datatypes import DataType, from_tag_type
from edge_agent.sparkplug.topics import (
    NAMESPACE,
    MessageType,
    Topic,
    device_topic,
    node_topic,
    parse_state,
    parse_topic,
    state_payload,
    state_topic,
)

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"

__all__ = [
    "BDSEQ",
    "NAMESPACE",
    "REBIRTH",
    "DataType",
    "MessageType",
    "Topic",
    "device_topic",
    "from_tag_type",
    "node_topic",
    "parse_state",
    "parse_topic",
    "state_payload",
    "state_topic",
]
