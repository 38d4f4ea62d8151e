"""The edge node's messages from outbox rows, decoded by the independent codec (tests/sparkplug_wire.py)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from sparkplug_wire import DataType, Metric, Payload, decode, encode

from edge_agent.outbox import Kind, Row
from edge_agent.publish.sparkplug import BirthDevice, BirthTag, EdgeNode, devices_from_config
from edge_agent.sparkplug import DataType as SpDataType

DEVICES = [
    BirthDevice(
        "plc1",
        (BirthTag("temp", SpDataType.FLOAT, "degC", "bearing"), BirthTag("speed", SpDataType.INT16, "rpm")),
    )
]


def _node() -> EdgeNode:
    return EdgeNode("g", "n", DEVICES, ["pump"])


def _telemetry(values: dict[str, Any], quality: str = "good", ts: str = "2026-01-01T00:00:01.000Z") -> Row:
    tags = [{"name": k, "value": v, "quality": quality, "ts": ts} for k, v in values.items()]
    record = {"schema": "edge-agent/telemetry/v1", "device": "plc1", "ts": ts, "tags": tags, "historical": False}
    return Row(1, "x/telemetry/plc1", json.dumps(record).encode(), Kind.TELEMETRY, 0, 1.0, 1)


def _event(kind: str, score: float = 3.0) -> Row:
    record = {
        "type": kind,
        "event_id": f"e-{kind}",
        "model": {"name": "pump"},
        "window": {"start": "2026-01-01T00:00:00.000Z", "end": "2026-01-01T00:00:02.000Z"},
        "score": score,
        "threshold": 1.5,
        "severity": "high",
        "contributions": [{"tag": "temp", "share": 0.7}, {"tag": "speed", "share": 0.3}],
    }
    return Row(2, "x/events/pump", json.dumps(record).encode(), Kind.EVENT, 1, 1.0, 1)


def test_births_name_every_metric_with_alias_type_and_properties() -> None:
    node = _node()
    (nbirth,) = node.births(bdseq=7, now=1.0)  # no DBIRTH yet: nothing read, its values would all be null
    (dbirth,) = node.from_row(_telemetry({"temp": 20.5, "speed": -3}), historical=False)
    n = decode(nbirth.payload)
    assert nbirth.topic == "spBv1.0/g/NBIRTH/n" and n.seq == 0
    assert n.metric("bdSeq").value == 7 and n.metric("bdSeq").datatype == DataType.INT64
    assert n.metric("Node Control/Rebirth").value is False
    names = {m.name: m.datatype for m in n.metrics}
    assert names["Models/pump/score"] == DataType.DOUBLE and names["Models/pump/active"] == DataType.BOOLEAN
    d = decode(dbirth.payload)
    assert dbirth.topic == "spBv1.0/g/DBIRTH/n/plc1" and d.seq == 1
    temp = d.metric("temp")
    assert temp.datatype == DataType.FLOAT and temp.properties is not None
    assert temp.properties["engUnit"].value == "degC" and temp.properties["description"].value == "bearing"
    assert temp.value == 20.5 and temp.timestamp is None  # the first record's values, not nulls
    aliases = [m.alias for m in (*n.metrics, *d.metrics) if m.alias is not None]
    assert len(aliases) == len(set(aliases))  # unique across the node
    # births once the device was seen (a rebirth, a reconnect): the DBIRTH with its last values
    again = node.births(bdseq=7, now=2.0)
    assert [m.type for m in again] == ["NBIRTH", "DBIRTH"]
    assert decode(again[1].payload).metric("temp").value == 20.5


def test_a_device_comms_lost_from_the_start_is_born_with_nulls_then_dead() -> None:
    node = _node()
    node.births(0, 1.0)
    assert node.from_row(Row(1, "x", b'{"device": "plc1", "tags": []}', Kind.TELEMETRY, 0, 1.0, 1), False) == []
    birth, death = node.from_row(_telemetry({"temp": None, "speed": None}, "comms-lost"), historical=False)
    assert (birth.topic, death.topic) == ("spBv1.0/g/DBIRTH/n/plc1", "spBv1.0/g/DDEATH/n/plc1")
    assert [decode(m.payload).seq for m in (birth, death)] == [1, 2]
    assert all(m.is_null for m in decode(birth.payload).metrics)
    assert node.from_row(_telemetry({"temp": None, "speed": None}, "comms-lost"), historical=False) == []
    (back,) = node.from_row(_telemetry({"temp": 22.0, "speed": 1}), historical=False)
    assert back.topic == "spBv1.0/g/DBIRTH/n/plc1" and decode(back.payload).metric("temp").value == 22.0


def test_data_by_exception_by_alias_and_signed_integers() -> None:
    node = _node()
    node.births(0, 1.0)
    node.from_row(_telemetry({"temp": 0.0, "speed": 0}), historical=False)  # the DBIRTH
    (first,) = node.from_row(_telemetry({"temp": 20.5, "speed": -3}), historical=False)
    p = decode(first.payload)
    assert first.topic == "spBv1.0/g/DDATA/n/plc1"
    assert all(m.name is None for m in p.metrics)
    assert sorted(m.value for m in p.metrics) == [20.5, 2**16 - 3]  # no datatype by alias: the host signs it
    assert node.from_row(_telemetry({"temp": 20.5, "speed": -3}), historical=False) == []  # nothing changed
    (second,) = node.from_row(_telemetry({"temp": 21.0, "speed": -3}), historical=True)
    (m,) = decode(second.payload).metrics
    assert m.value == 21.0 and m.is_historical and m.timestamp == 1767225601000


def test_comms_lost_on_every_tag_is_one_ddeath_then_a_dbirth_when_back() -> None:
    node = _node()
    node.births(0, 1.0)
    node.from_row(_telemetry({"temp": 20.5, "speed": 1}), historical=False)
    (death,) = node.from_row(_telemetry({"temp": None, "speed": None}, "comms-lost"), historical=False)
    assert death.topic == "spBv1.0/g/DDEATH/n/plc1"
    assert node.from_row(_telemetry({"temp": None, "speed": None}, "comms-lost"), historical=False) == []
    (birth,) = node.from_row(_telemetry({"temp": 22.0, "speed": 1}), historical=False)
    assert birth.topic == "spBv1.0/g/DBIRTH/n/plc1"
    assert decode(birth.payload).metric("temp").value == 22.0
    # a bad tag among good ones is a null value, not a death
    (data,) = node.from_row(_telemetry({"temp": 1.0}, "bad"), historical=False)
    assert [m.is_null for m in decode(data.payload).metrics] == [True]


def test_seq_wraps_from_255_to_0_across_every_node_message() -> None:
    node = _node()
    node.births(0, 1.0)  # NBIRTH 0; the first record is the DBIRTH (1)
    seqs = [decode(m.payload).seq for i in range(300) for m in node.from_row(_telemetry({"temp": float(i)}), False)]
    assert seqs[:3] == [1, 2, 3]
    assert seqs[254:257] == [255, 0, 1]
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs))


def test_anomaly_events_and_scores_are_node_metrics() -> None:
    node = _node()
    nbirth = decode(node.births(0, 1.0)[0].payload)
    alias = {m.alias: m.name for m in nbirth.metrics if m.alias is not None}
    (start,) = node.from_row(_event("anomaly.start"), historical=False)
    assert start.topic == "spBv1.0/g/NDATA/n"
    got = {alias[m.alias]: m.value for m in decode(start.payload).metrics}
    assert got == {
        "Models/pump/score": 3.0,
        "Models/pump/threshold": 1.5,
        "Models/pump/active": True,
        "Models/pump/severity": "high",
        "Models/pump/last_event_id": "e-anomaly.start",
        "Models/pump/top_tags": "temp,speed",
    }
    (end,) = node.from_row(_event("anomaly.end", score=1.0), historical=False)
    got = {alias[m.alias]: m.value for m in decode(end.payload).metrics}
    assert got["Models/pump/active"] is False and got["Models/pump/score"] == 1.0
    assert "Models/pump/threshold" not in got  # unchanged: by exception
    score = {"model": {"name": "pump"}, "ts": "2026-01-01T00:00:03.000Z", "score": 0.5, "threshold": 1.5}
    (s,) = node.from_row(Row(3, "x", json.dumps(score).encode(), Kind.SCORE, 0, 1.0, 1), historical=False)
    assert {alias[m.alias]: m.value for m in decode(s.payload).metrics} == {"Models/pump/score": 0.5}
    # a model the births did not announce is skipped and counted
    other = {"model": {"name": "other"}, "score": 1.0}
    assert node.from_row(Row(4, "x", json.dumps(other).encode(), Kind.SCORE, 0, 1.0, 1), False) == []
    assert node.skipped == 1


def test_rebirth_command_by_name_or_alias() -> None:
    node = _node()
    rebirth = node.node_metrics["Node Control/Rebirth"]
    by_name = Payload(metrics=[Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=True)])
    by_alias = Payload(metrics=[Metric(alias=rebirth.alias, datatype=DataType.BOOLEAN, value=True)])
    false = Payload(metrics=[Metric(name="Node Control/Rebirth", datatype=DataType.BOOLEAN, value=False)])
    assert node.rebirth_requested(encode(by_name)) and node.rebirth_requested(encode(by_alias))
    assert not node.rebirth_requested(encode(false))
    assert not node.rebirth_requested(b"\xff\xff not protobuf")


def test_birth_devices_from_a_validated_config(tmp_path: Any) -> None:
    from edge_agent.config import parse_config

    cfg = parse_config(
        """
devices:
  - name: plc1
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: a, address: "40001", type: float32, unit: bar, description: suction}
      - {name: b, address: "40003", type: int16, scale: 0.1}
      - {name: c, address: "00001"}
  - name: s7
    type: s7
    host: 127.0.0.1
    tags:
      - {name: d, address: DB1.DBD0, type: real}
      - {name: e, address: DB1.DBW4, type: int}
"""
    )
    devices = devices_from_config(cfg.devices)
    got = {t.name: (t.datatype, t.unit, t.description) for d in devices for t in d.tags}
    assert got == {
        "a": (SpDataType.FLOAT, "bar", "suction"),
        "b": (SpDataType.DOUBLE, None, None),  # scaled: fractional values
        "c": (SpDataType.BOOLEAN, None, None),
        "d": (SpDataType.FLOAT, None, None),
        "e": (SpDataType.INT16, None, None),
    }
