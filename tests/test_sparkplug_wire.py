"""The tests' own Sparkplug B codec (tests/sparkplug_wire.py): byte vectors worked out from the protobuf encoding
rules by hand, round trips, and malformed input."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sparkplug_wire import DataType, Metric, Payload, PropertyValue, WireError, decode, encode, varint


@pytest.mark.parametrize(
    ("n", "wire"),
    [(0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (150, "9601"), (300, "ac02"), (2**64 - 1, "ff" * 9 + "01")],
)
def test_varints_are_the_protobuf_documentations_examples(n: int, wire: str) -> None:
    """150 → 96 01 and 300 → ac 02 are the examples of protobuf.dev's encoding page; 2**64-1 takes ten bytes."""
    assert varint(n) == bytes.fromhex(wire)
    assert decode(b"\x18" + bytes.fromhex(wire)).seq == n  # field 3 (seq), wire type 0: key 0x18


def test_payload_fields_by_number() -> None:
    """timestamp is field 1 (key 08), seq field 3 (18), uuid field 4 (22), body field 5 (2a)."""
    data = encode(Payload(timestamp=150, seq=255, uuid="testing", body=b"\x01\x02"))
    assert data == bytes.fromhex("089601" + "18ff01" + "220774657374696e67" + "2a020102")
    assert decode(data) == Payload(timestamp=150, seq=255, uuid="testing", body=b"\x01\x02")


def _one_metric(metric_hex: str) -> bytes:
    body = bytes.fromhex(metric_hex)
    return b"\x12" + varint(len(body)) + body  # field 2 (metrics), length-delimited


@pytest.mark.parametrize(
    ("metric", "metric_hex", "field"),
    [
        # Int32 -1: uint32 int_value (field 10, key 0x50) holding the 32-bit two's complement, five varint bytes
        (Metric(datatype=DataType.INT32, value=-1), "2003" + "50ffffffff0f", "int_value"),
        (Metric(datatype=DataType.INT16, value=-2), "2002" + "50feffffff0f", "int_value"),
        (Metric(datatype=DataType.UINT32, value=2**32 - 1), "2007" + "50ffffffff0f", "int_value"),
        # Int64 -1: uint64 long_value (field 11, key 0x58), ten varint bytes
        (Metric(datatype=DataType.INT64, value=-1), "2004" + "58" + "ff" * 9 + "01", "long_value"),
        (Metric(datatype=DataType.DATETIME, value=1_700_000_000_000), "200d" + "58" + varint(1_700_000_000_000).hex(),
         "long_value"),
        # Float: fixed32 (field 12, key 0x65), little-endian IEEE 754; Double: fixed64 (field 13, key 0x69)
        (Metric(datatype=DataType.FLOAT, value=1.5), "2009" + "650000c03f", "float_value"),
        (Metric(datatype=DataType.DOUBLE, value=1.5), "200a" + "69000000000000f83f", "double_value"),
        # Boolean false is written (the value is present, only false): field 14, key 0x70
        (Metric(datatype=DataType.BOOLEAN, value=False), "200b" + "7000", "boolean_value"),
        (Metric(datatype=DataType.STRING, value="ok"), "200c" + "7a026f6b", "string_value"),
        # field 16 needs a two-byte key: (16 << 3 | 2) = 130 → 82 01
        (Metric(datatype=DataType.BYTES, value=b"\x00\xff"), "2011" + "8201" + "0200ff", "bytes_value"),
    ],
)
def test_metric_values_go_in_the_field_their_datatype_names(metric: Metric, metric_hex: str, field: str) -> None:
    """The datatype table of Sparkplug 3.0 (6.4.16), byte for byte."""
    assert encode(Payload(metrics=[metric])) == _one_metric(metric_hex)
    back = decode(_one_metric(metric_hex)).metrics[0]
    assert back.value_field == field
    assert back.value == metric.value
    assert back.datatype == metric.datatype


def test_metric_header_fields() -> None:
    """name (1), alias (2), timestamp (3), datatype (4), is_historical (5), is_transient (6), is_null (7)."""
    m = Metric(name="a/b", alias=7, timestamp=1, datatype=DataType.FLOAT, is_historical=True, is_transient=True,
               is_null=True)
    data = encode(Payload(metrics=[m]))
    assert data == _one_metric("0a03612f62" + "1007" + "1801" + "2009" + "2801" + "3001" + "3801")
    assert decode(data).metrics[0] == Metric(name="a/b", alias=7, timestamp=1, datatype=DataType.FLOAT,
                                             is_historical=True, is_transient=True, is_null=True)


def test_narrow_twos_complement_reads_back_signed() -> None:
    """Tahu's Python library writes Int8 -1 as 255: the decoder reads the same -1 as from the 32-bit form."""
    assert decode(_one_metric("2001" + "50ff01")).metrics[0].value == -1
    assert decode(_one_metric("2001" + "50ffffffff0f")).metrics[0].value == -1
    assert decode(_one_metric("2005" + "50ff01")).metrics[0].value == 255  # UInt8 stays unsigned


def test_properties_are_parallel_keys_and_values() -> None:
    """PropertySet: keys (1) and values (2) repeated in parallel; PropertyValue: type (1), string_value (8)."""
    props = {"engUnit": PropertyValue(DataType.STRING, "°C"), "min": PropertyValue(DataType.INT32, -5)}
    data = encode(Payload(metrics=[Metric(name="t", properties=props)]))
    unit = "°C".encode()
    pset = (
        "0a07" + b"engUnit".hex() + "0a03" + b"min".hex()
        + "12" + varint(4 + len(unit)).hex() + "080c" + "42" + varint(len(unit)).hex() + unit.hex()
        + "1208" + "0803" + "18fbffffff0f"
    )
    assert data == _one_metric("0a0174" + "4a" + varint(len(bytes.fromhex(pset))).hex() + pset)
    back = decode(data).metric("t").properties
    assert back is not None
    assert back["engUnit"].value == "°C" and back["engUnit"].value_field == "string_value"
    assert back["min"].value == -5


def test_metadata_and_unknown_fields() -> None:
    """Metadata's scalar fields round-trip; an unknown field is skipped and its number kept."""
    meta = {"is_multi_part": False, "content_type": "text/plain", "size": 12, "seq": 1, "description": "d"}
    p = decode(encode(Payload(metrics=[Metric(name="f", datatype=DataType.BYTES, value=b"x", metadata=meta)])))
    assert p.metric("f").metadata == meta
    extra = encode(Payload(seq=1)) + bytes.fromhex("3005") + bytes.fromhex("3a0101")  # fields 6 (varint), 7 (LEN)
    assert decode(extra).unknown_fields == [6, 7]
    assert decode(extra).seq == 1


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x08\x96", "past the end"),  # a varint cut short
        (b"\x12\x05\x0a", "past the end"),  # a metric longer than the buffer
        (b"\x0b", "wire type 3"),  # a deprecated group
        (b"\x18\x01\x00", "field number 0"),
        (b"\x0a\x00", "wire type 2, expected 0"),  # timestamp as length-delimited
        (b"\x12\x03\x0a\x01\xff", "not UTF-8"),
        (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    ],
)
def test_malformed_bytes_raise_wire_error(data: bytes, why: str) -> None:
    """Every malformed input is a WireError saying why, never another exception."""
    with pytest.raises(WireError, match=why):
        decode(data)


def test_out_of_range_integers_are_refused() -> None:
    """An Int8 of 200 is a caller's mistake, not silently wrapped."""
    with pytest.raises(WireError, match="does not fit INT8"):
        encode(Payload(metrics=[Metric(datatype=DataType.INT8, value=200)]))


_INT_RANGES = {
    DataType.INT8: (-(2**7), 2**7 - 1),
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    """A metric of any scalar datatype with a value in its range."""
    kind = draw(st.sampled_from([*_INT_RANGES, DataType.FLOAT, DataType.DOUBLE, DataType.BOOLEAN, DataType.STRING]))
    if kind in _INT_RANGES:
        value: object = draw(st.integers(*_INT_RANGES[kind]))
    elif kind == DataType.FLOAT:
        value = struct.unpack("<f", struct.pack("<f", draw(st.floats(width=32, allow_nan=False))))[0]
    elif kind == DataType.DOUBLE:
        value = draw(st.floats(allow_nan=False))
    elif kind == DataType.BOOLEAN:
        value = draw(st.booleans())
    else:
        value = draw(st.text(max_size=20))
    return Metric(
        name=draw(st.none() | st.text(max_size=12)),
        alias=draw(st.none() | st.integers(0, 2**64 - 1)),
        timestamp=draw(st.none() | st.integers(0, 2**64 - 1)),
        datatype=kind,
        is_historical=draw(st.booleans()),
        value=value,
    )


@given(st.lists(metrics(), max_size=5), st.none() | st.integers(0, 255), st.none() | st.integers(0, 2**64 - 1))
def test_round_trip(ms: list[Metric], seq: int | None, ts: int | None) -> None:
    """decode(encode(p)) == p for any payload of scalar metrics."""
    p = decode(encode(Payload(timestamp=ts, metrics=ms, seq=seq)))
    assert p.seq == seq and p.timestamp == ts and len(p.metrics) == len(ms)
    for got, want in zip(p.metrics, ms, strict=True):
        assert (got.name, got.alias, got.timestamp, got.datatype, got.is_historical) == (
            want.name, want.alias, want.timestamp, want.datatype, want.is_historical)
        assert got.value == want.value or (math.isnan(got.value) and math.isnan(want.value))
        assert type(got.value) is type(want.value)
