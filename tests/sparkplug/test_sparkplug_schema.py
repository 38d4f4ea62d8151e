"""The Sparkplug B base layer: the payload schema against hand-written wire bytes, values, types and topics."""

from __future__ import annotations

import math

import pytest

from edge_agent.sparkplug import (
    DataType,
    MessageType,
    Topic,
    device_topic,
    from_tag_type,
    node_topic,
    parse_state,
    parse_topic,
    proto,
    state_payload,
    state_topic,
)


def test_payload_bytes_follow_the_specification_field_numbers() -> None:
    # timestamp (1, varint), metrics (2, bytes), seq (3, varint); Metric: name 1, alias 2, datatype 4,
    # boolean_value 14 — the bytes written out by hand from sparkplug_b.proto
    p = proto.Payload(timestamp=300, seq=5)
    m = p.metrics.add(name="a", alias=7, datatype=DataType.BOOLEAN)
    proto.set_value(m, DataType.BOOLEAN, True)
    metric = bytes([0x0A, 1, ord("a"), 0x10, 7, 0x20, 11, 0x70, 1])
    assert p.SerializeToString() == bytes([0x08, 0xAC, 0x02, 0x12, len(metric), *metric, 0x18, 5])


def test_double_and_float_metrics_use_fixed_width_fields() -> None:
    p = proto.Payload()
    proto.set_value(p.metrics.add(datatype=DataType.DOUBLE), DataType.DOUBLE, 1.5)
    proto.set_value(p.metrics.add(datatype=DataType.FLOAT), DataType.FLOAT, 1.5)
    raw = p.SerializeToString()
    assert bytes([0x69, 0, 0, 0, 0, 0, 0, 0xF8, 0x3F]) in raw  # field 13, wire type 1: double_value
    assert bytes([0x65, 0, 0, 0xC0, 0x3F]) in raw  # field 12, wire type 5: float_value


@pytest.mark.parametrize(
    ("datatype", "value", "field", "wire"),
    [
        (DataType.INT8, -1, "int_value", 255),
        (DataType.INT16, -2, "int_value", 65534),
        (DataType.INT32, -3, "int_value", 2**32 - 3),
        (DataType.INT64, -4, "long_value", 2**64 - 4),
        (DataType.UINT16, 65535, "int_value", 65535),
        (DataType.UINT64, 2**64 - 1, "long_value", 2**64 - 1),
        (DataType.DATETIME, 1_700_000_000_000, "long_value", 1_700_000_000_000),
    ],
)
def test_integers_travel_unsigned_and_read_back_signed(datatype: DataType, value: int, field: str, wire: int) -> None:
    m = proto.Metric(datatype=datatype)
    proto.set_value(m, datatype, value)
    decoded = proto.Metric.FromString(m.SerializeToString())
    assert decoded.WhichOneof("value") == field
    assert getattr(decoded, field) == wire
    assert proto.get_value(decoded) == value
    assert proto.get_value(proto.Metric.FromString(m.SerializeToString()), datatype) == value


def test_null_and_non_finite_integers_are_is_null() -> None:
    m = proto.Metric(datatype=DataType.INT32)
    proto.set_value(m, DataType.INT32, math.nan)
    assert m.is_null and proto.get_value(m) is None
    s = proto.Metric(datatype=DataType.STRING)
    proto.set_value(s, DataType.STRING, None)
    assert s.is_null and s.WhichOneof("value") is None


def test_property_sets_round_trip() -> None:
    props = proto.property_set({"engUnit": (DataType.STRING, "°C"), "engLow": (DataType.DOUBLE, -5.0)})
    back = proto.PropertySet.FromString(props.SerializeToString())
    assert proto.properties_dict(back) == {"engUnit": "°C", "engLow": -5.0}
    assert [v.type for v in back.values] == [DataType.STRING, DataType.DOUBLE]


def test_a_decoder_accepts_every_schema_message() -> None:
    # DataSet, Template and MetaData are in the schema so that what other nodes send decodes
    m = proto.Metric(name="ds", datatype=DataType.DATASET)
    m.dataset_value.num_of_columns = 2
    m.dataset_value.columns.extend(["x", "y"])
    m.dataset_value.types.extend([DataType.INT32, DataType.STRING])
    row = m.dataset_value.rows.add()
    row.elements.add(int_value=3)
    row.elements.add(string_value="s")
    t = proto.Metric(name="t", datatype=DataType.TEMPLATE)
    t.template_value.is_definition = True
    t.template_value.metrics.add(name="inner", datatype=DataType.DOUBLE, double_value=2.0)
    t.template_value.parameters.add(name="p", type=DataType.UINT32, int_value=4)
    t.metadata.content_type = "text/plain"
    p = proto.Payload(metrics=[m, t], uuid="u", body=b"\x00")
    back = proto.Payload.FromString(p.SerializeToString())
    assert back == p
    assert back.metrics[0].dataset_value.rows[0].elements[1].string_value == "s"
    assert back.metrics[1].template_value.metrics[0].double_value == 2.0


@pytest.mark.parametrize(
    ("name", "datatype"),
    [
        ("float32", DataType.FLOAT),
        ("REAL", DataType.FLOAT),
        ("int16", DataType.INT16),
        ("DINT", DataType.INT32),
        ("bool", DataType.BOOLEAN),
        ("string[16]", DataType.STRING),
        ("uint64", DataType.UINT64),
        ("lreal", DataType.DOUBLE),
        (None, DataType.DOUBLE),
    ],
)
def test_tag_types_map_to_sparkplug_types(name: str | None, datatype: DataType) -> None:
    assert from_tag_type(name) is datatype


def test_topics_format_and_parse() -> None:
    assert node_topic("plant-a", "NBIRTH", "line-3") == "spBv1.0/plant-a/NBIRTH/line-3"
    assert device_topic("g", MessageType.DDATA, "n", "plc1") == "spBv1.0/g/DDATA/n/plc1"
    assert state_topic("scada-1") == "spBv1.0/STATE/scada-1"
    assert parse_topic("spBv1.0/g/DDATA/n/plc1") == Topic(MessageType.DDATA, "g", "n", "plc1")
    assert parse_topic("spBv1.0/g/NCMD/n") == Topic(MessageType.NCMD, "g", "n")
    assert parse_topic("spBv1.0/STATE/h") == Topic(MessageType.STATE, "", "h")
    assert str(parse_topic("spBv1.0/g/DDATA/n/plc1")) == "spBv1.0/g/DDATA/n/plc1"
    for bad in ("spBv1.0/g/DDATA/n", "spBv1.0/g/NDATA/n/d", "spAv1.0/g/NDATA/n", "spBv1.0/g/XDATA/n", "x"):
        assert parse_topic(bad) is None, bad
    with pytest.raises(ValueError, match="group id"):
        node_topic("a/b", "NDATA", "n")


def test_state_payload_is_the_3_0_json() -> None:
    raw = state_payload(True, 1_700_000_000_123)
    assert raw == b'{"online":true,"timestamp":1700000000123}'
    assert parse_state(raw) == (True, 1_700_000_000_123)
    assert parse_state(b"ONLINE") is None  # the 2.2 text payload is not 3.0
    assert parse_state(b'{"online":"yes"}') is None


@pytest.mark.parametrize(
    ("datatype", "wire", "value"), [(DataType.INT8, 2**32 - 1, -1), (DataType.INT16, 2**32 - 2, -2)]
)
def test_small_signed_integers_sign_extended_to_32_bits_read_back_negative(
    datatype: DataType, wire: int, value: int
) -> None:
    # Java/Ignition nodes write an Int8 of -1 as 0xFFFFFFFF in int_value (sign-extended), Tahu's Python as 0xFF
    m = proto.Metric(datatype=datatype, int_value=wire)
    assert proto.get_value(proto.Metric.FromString(m.SerializeToString())) == value
