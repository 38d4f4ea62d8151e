"""An independent Sparkplug B payload codec for tests: the protobuf wire format written out by hand.

The agent encodes and decodes Sparkplug B with the protobuf runtime (`edge_agent/sparkplug/`). The tests check
it against this second implementation, written from the Sparkplug 3.0 specification (chapter 6, the
`org.eclipse.tahu.protobuf.Payload` message) and the protobuf encoding rules
(https://protobuf.dev/programming-guides/encoding/), and importing nothing from google.protobuf, so a mistake
shared by the schema and the runtime cannot pass unseen. Hand-written on purpose: a library would be the same
implementation twice.

What it covers (what an edge node's births, data and deaths carry):

- Payload: timestamp (1), metrics (2), seq (3), uuid (4), body (5).
- Metric: name (1), alias (2), timestamp (3), datatype (4), is_historical (5), is_transient (6), is_null (7),
  metadata (8, its scalar fields), properties (9, a PropertySet), and the scalar values int_value (10),
  long_value (11), float_value (12), double_value (13), boolean_value (14), string_value (15), bytes_value (16).
  DataSet (17), Template (18) and extension (19) values are kept as their raw bytes, not decoded.
- PropertySet: keys (1) and values (2); PropertyValue: type (1), is_null (2) and its scalar values (3–8) or a
  nested PropertySet (9).

Integers follow the specification's datatype table: Int8/16/32 and UInt8/16/32 go in the uint32 `int_value`,
Int64, UInt64 and DateTime in the uint64 `long_value`; negative values are two's complement (on encode in 32 bits
for int_value, as the Eclipse Tahu Java library writes them; on decode either that or the narrow width, as Tahu's
Python library writes them, reads back the same signed value). No zigzag: Sparkplug uses no sint types.

    data = encode(Payload(seq=0, metrics=[Metric(name="t", alias=1, datatype=DataType.FLOAT, value=1.5)]))
    decode(data).metric("t").value  # 1.5
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = [
    "DataType",
    "Metric",
    "Payload",
    "PropertyValue",
    "WireError",
    "decode",
    "encode",
]


class DataType(IntEnum):
    """Sparkplug B 3.0 datatypes (specification 6.4.16), the numbers a metric's `datatype` carries.

    Written out again rather than imported from edge_agent.sparkplug: the numbers are part of what this codec checks.
    """

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19
    PROPERTYSET = 20
    PROPERTYSETLIST = 21


class WireError(ValueError):
    """The bytes are not a valid protobuf encoding of a Sparkplug B payload."""


# wire types (protobuf encoding: the low three bits of a field's key)
VARINT, I64, LEN, I32 = 0, 1, 2, 5

_SIGNED_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
_UNSIGNED_BITS = {
    DataType.UINT8: 8,
    DataType.UINT16: 16,
    DataType.UINT32: 32,
    DataType.UINT64: 64,
    DataType.DATETIME: 64,
}
_INT32_TYPES = {DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16, DataType.UINT32}
_INT64_TYPES = {DataType.INT64, DataType.UINT64, DataType.DATETIME}
_STRING_TYPES = {DataType.STRING, DataType.TEXT, DataType.UUID}
_BYTES_TYPES = {DataType.BYTES, DataType.FILE}

# the value fields of a Metric and of a PropertyValue (their `oneof value`), by name
METRIC_VALUE_FIELDS = {
    10: "int_value",
    11: "long_value",
    12: "float_value",
    13: "double_value",
    14: "boolean_value",
    15: "string_value",
    16: "bytes_value",
    17: "dataset_value",
    18: "template_value",
    19: "extension_value",
}
PROPERTY_VALUE_FIELDS = {
    3: "int_value",
    4: "long_value",
    5: "float_value",
    6: "double_value",
    7: "boolean_value",
    8: "string_value",
    9: "propertyset_value",
    10: "propertysets_value",
    11: "extension_value",
}
METADATA_FIELDS = {
    1: ("is_multi_part", VARINT),
    2: ("content_type", LEN),
    3: ("size", VARINT),
    4: ("seq", VARINT),
    5: ("file_name", LEN),
    6: ("file_type", LEN),
    7: ("md5", LEN),
    8: ("description", LEN),
}


@dataclass
class PropertyValue:
    """One value of a PropertySet (a metric's engineering unit, description, …)."""

    type: int
    value: Any = None  # int, float, bool, str, or dict[str, PropertyValue] for a nested PropertySet
    is_null: bool = False
    value_field: str | None = None  # on decode: which field of the oneof carried the value


@dataclass
class Metric:
    """One metric of a payload; `value_field` says on decode which field carried the value (int_value, …)."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int | None = None
    is_historical: bool = False
    is_transient: bool = False
    is_null: bool = False
    value: Any = None
    properties: dict[str, PropertyValue] | None = None
    metadata: dict[str, Any] | None = None
    value_field: str | None = None
    unknown_fields: list[int] = field(default_factory=list)  # field numbers decode skipped


@dataclass
class Payload:
    """A Sparkplug B payload: what NBIRTH, DBIRTH, NDATA, DDATA, NDEATH, DDEATH and NCMD/DCMD carry."""

    timestamp: int | None = None
    metrics: list[Metric] = field(default_factory=list)
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None
    unknown_fields: list[int] = field(default_factory=list)  # field numbers decode skipped

    def metric(self, name: str) -> Metric:
        """The first metric with this name; KeyError names the ones there are."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r} in the payload; it has {[m.name for m in self.metrics]}")

    def by_alias(self) -> dict[int, Metric]:
        """Metrics with an alias, keyed by it."""
        return {m.alias: m for m in self.metrics if m.alias is not None}


# --------------------------------------------------------------------------------------------------- encoding


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint (least significant group first)."""
    if n < 0:
        raise WireError(f"varint of a negative number {n}: encode it as two's complement first")
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _len_field(number: int, data: bytes) -> bytes:
    return _key(number, LEN) + varint(len(data)) + data


def _uint_field(number: int, n: int) -> bytes:
    return _key(number, VARINT) + varint(n)


def _infer_type(value: Any) -> DataType:
    if isinstance(value, bool):
        return DataType.BOOLEAN
    if isinstance(value, int):
        return DataType.INT64
    if isinstance(value, float):
        return DataType.DOUBLE
    if isinstance(value, str):
        return DataType.STRING
    if isinstance(value, bytes | bytearray):
        return DataType.BYTES
    if isinstance(value, dict):
        return DataType.PROPERTYSET
    raise WireError(f"no Sparkplug datatype for a {type(value).__name__} value; give one")


def _int_bits(datatype: int, value: int) -> int:
    """An integer checked against its datatype's range, as the unsigned bits its field carries."""
    dt = DataType(datatype)
    if dt in _SIGNED_BITS:
        bits = _SIGNED_BITS[dt]
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        bits = _UNSIGNED_BITS[dt]
        lo, hi = 0, (1 << bits) - 1
    if not lo <= value <= hi:
        raise WireError(f"{value} does not fit {dt.name}")
    width = 32 if dt in _INT32_TYPES else 64
    return value & ((1 << width) - 1)


def _scalar(datatype: int, value: Any, fields: dict[str, int]) -> bytes:
    """A value in the field its datatype names (`fields`: value field name → number in this message)."""
    dt = DataType(datatype)
    if dt in _INT32_TYPES:
        return _uint_field(fields["int_value"], _int_bits(dt, int(value)))
    if dt in _INT64_TYPES:
        return _uint_field(fields["long_value"], _int_bits(dt, int(value)))
    if dt == DataType.FLOAT:
        return _key(fields["float_value"], I32) + struct.pack("<f", value)
    if dt == DataType.DOUBLE:
        return _key(fields["double_value"], I64) + struct.pack("<d", value)
    if dt == DataType.BOOLEAN:
        return _uint_field(fields["boolean_value"], 1 if value else 0)
    if dt in _STRING_TYPES:
        return _len_field(fields["string_value"], str(value).encode())
    if dt in _BYTES_TYPES and "bytes_value" in fields:
        return _len_field(fields["bytes_value"], bytes(value))
    if dt == DataType.PROPERTYSET and "propertyset_value" in fields:
        return _len_field(fields["propertyset_value"], _encode_propertyset(value))
    raise WireError(f"this codec does not encode {dt.name} values")


_METRIC_FIELD_NUMBERS = {name: n for n, name in METRIC_VALUE_FIELDS.items()}
_PROPERTY_FIELD_NUMBERS = {name: n for n, name in PROPERTY_VALUE_FIELDS.items()}


def _encode_property_value(pv: PropertyValue) -> bytes:
    out = _uint_field(1, pv.type)
    if pv.is_null:
        return out + _uint_field(2, 1)
    return out + _scalar(pv.type, pv.value, _PROPERTY_FIELD_NUMBERS)


def _encode_propertyset(props: dict[str, PropertyValue]) -> bytes:
    # keys (1) and values (2) are parallel repeated fields: the i-th key names the i-th value
    keys = b"".join(_len_field(1, k.encode()) for k in props)
    values = b"".join(_len_field(2, _encode_property_value(v)) for v in props.values())
    return keys + values


def _encode_metadata(meta: dict[str, Any]) -> bytes:
    out = bytearray()
    for number, (name, wire_type) in METADATA_FIELDS.items():
        if name not in meta:
            continue
        v = meta[name]
        out += _uint_field(number, int(v)) if wire_type == VARINT else _len_field(number, str(v).encode())
    return bytes(out)


def _encode_metric(m: Metric) -> bytes:
    out = bytearray()
    if m.name is not None:
        out += _len_field(1, m.name.encode())
    if m.alias is not None:
        out += _uint_field(2, m.alias)
    if m.timestamp is not None:
        out += _uint_field(3, m.timestamp)
    datatype = m.datatype
    if datatype is None and m.value is not None:
        datatype = _infer_type(m.value)
    if datatype is not None:
        out += _uint_field(4, int(datatype))
    if m.is_historical:
        out += _uint_field(5, 1)
    if m.is_transient:
        out += _uint_field(6, 1)
    if m.is_null:
        out += _uint_field(7, 1)
    if m.metadata is not None:
        out += _len_field(8, _encode_metadata(m.metadata))
    if m.properties is not None:
        out += _len_field(9, _encode_propertyset(m.properties))
    if m.value is not None and not m.is_null:
        assert datatype is not None
        out += _scalar(datatype, m.value, _METRIC_FIELD_NUMBERS)
    return bytes(out)


def encode(payload: Payload) -> bytes:
    """A Payload as protobuf bytes, fields in number order (as protobuf runtimes write them)."""
    out = bytearray()
    if payload.timestamp is not None:
        out += _uint_field(1, payload.timestamp)
    for m in payload.metrics:
        out += _len_field(2, _encode_metric(m))
    if payload.seq is not None:
        out += _uint_field(3, payload.seq)
    if payload.uuid is not None:
        out += _len_field(4, payload.uuid.encode())
    if payload.body is not None:
        out += _len_field(5, payload.body)
    return bytes(out)


# --------------------------------------------------------------------------------------------------- decoding


class _Reader:
    """Reads protobuf fields from a buffer: (field number, wire type, value) with LEN values as bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise WireError(f"varint runs past the end at byte {self.pos}")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift >= 70:  # 10 bytes hold any 64-bit value
                raise WireError(f"varint longer than 10 bytes at byte {self.pos}")

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise WireError(f"field of {size} bytes runs past the end at byte {self.pos}")
        chunk = bytes(self.data[self.pos : self.pos + size])
        self.pos += size
        return chunk

    def fields(self) -> Any:
        """Yield (number, wire type, value): int for VARINT, bytes for I64/I32/LEN."""
        while self.pos < len(self.data):
            key = self.varint()
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise WireError(f"field number 0 at byte {self.pos}")
            if wire_type == VARINT:
                yield number, wire_type, self.varint()
            elif wire_type == I64:
                yield number, wire_type, self.take(8)
            elif wire_type == LEN:
                yield number, wire_type, self.take(self.varint())
            elif wire_type == I32:
                yield number, wire_type, self.take(4)
            else:  # 3 and 4 are the deprecated groups, 6 and 7 do not exist
                raise WireError(f"wire type {wire_type} of field {number} is not supported")


def _expect(number: int, wire_type: int, want: int) -> None:
    if wire_type != want:
        raise WireError(f"field {number} has wire type {wire_type}, expected {want}")


def _signed(datatype: int | None, n: int) -> int:
    """A decoded integer as its datatype reads it: two's complement for the signed types, at their width."""
    if datatype is None or datatype not in _SIGNED_BITS:
        return n
    bits = _SIGNED_BITS[DataType(datatype)]
    n &= (1 << bits) - 1
    return n - (1 << bits) if n >> (bits - 1) else n


def _value(number: int, wire_type: int, raw: Any, names: dict[int, str]) -> tuple[str, Any]:
    """A oneof value field: (field name, Python value, still unsigned for integers)."""
    name = names[number]
    if name in ("int_value", "long_value", "boolean_value"):
        _expect(number, wire_type, VARINT)
        return name, bool(raw) if name == "boolean_value" else raw
    if name == "float_value":
        _expect(number, wire_type, I32)
        return name, struct.unpack("<f", raw)[0]
    if name == "double_value":
        _expect(number, wire_type, I64)
        return name, struct.unpack("<d", raw)[0]
    _expect(number, wire_type, LEN)
    if name == "string_value":
        try:
            return name, raw.decode()
        except UnicodeDecodeError as exc:
            raise WireError(f"string_value is not UTF-8: {exc}") from exc
    if name == "propertyset_value":
        return name, _decode_propertyset(raw)
    return name, raw  # bytes, and the raw bytes of DataSet, Template, PropertySetList and extensions


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise WireError(f"{what} is not UTF-8: {exc}") from exc


def _decode_property_value(data: bytes) -> PropertyValue:
    pv = PropertyValue(type=0)
    for number, wire_type, raw in _Reader(data).fields():
        if number == 1:
            _expect(number, wire_type, VARINT)
            pv.type = raw
        elif number == 2:
            _expect(number, wire_type, VARINT)
            pv.is_null = bool(raw)
        elif number in PROPERTY_VALUE_FIELDS:
            pv.value_field, pv.value = _value(number, wire_type, raw, PROPERTY_VALUE_FIELDS)
    if isinstance(pv.value, int) and not isinstance(pv.value, bool):
        pv.value = _signed(pv.type, pv.value)
    return pv


def _decode_propertyset(data: bytes) -> dict[str, PropertyValue]:
    keys: list[str] = []
    values: list[PropertyValue] = []
    for number, wire_type, raw in _Reader(data).fields():
        if number == 1:
            _expect(number, wire_type, LEN)
            keys.append(_text(raw, "a property key"))
        elif number == 2:
            _expect(number, wire_type, LEN)
            values.append(_decode_property_value(raw))
    if len(keys) != len(values):
        raise WireError(f"a PropertySet has {len(keys)} keys and {len(values)} values")
    return dict(zip(keys, values, strict=True))


def _decode_metadata(data: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for number, wire_type, raw in _Reader(data).fields():
        if number not in METADATA_FIELDS:
            continue
        name, want = METADATA_FIELDS[number]
        _expect(number, wire_type, want)
        meta[name] = (bool(raw) if name == "is_multi_part" else raw) if want == VARINT else _text(raw, name)
    return meta


def _decode_metric(data: bytes) -> Metric:
    m = Metric()
    for number, wire_type, raw in _Reader(data).fields():
        if number == 1:
            _expect(number, wire_type, LEN)
            m.name = _text(raw, "a metric name")
        elif number in (2, 3, 4, 5, 6, 7):
            _expect(number, wire_type, VARINT)
            if number == 2:
                m.alias = raw
            elif number == 3:
                m.timestamp = raw
            elif number == 4:
                m.datatype = raw
            elif number == 5:
                m.is_historical = bool(raw)
            elif number == 6:
                m.is_transient = bool(raw)
            else:
                m.is_null = bool(raw)
        elif number == 8:
            _expect(number, wire_type, LEN)
            m.metadata = _decode_metadata(raw)
        elif number == 9:
            _expect(number, wire_type, LEN)
            m.properties = _decode_propertyset(raw)
        elif number in METRIC_VALUE_FIELDS:
            m.value_field, m.value = _value(number, wire_type, raw, METRIC_VALUE_FIELDS)
        else:
            m.unknown_fields.append(number)
    if m.value_field in ("int_value", "long_value"):
        m.value = _signed(m.datatype, m.value)
    return m


def decode(data: bytes) -> Payload:
    """Protobuf bytes as a Payload; WireError when they are not a valid encoding of one."""
    p = Payload()
    for number, wire_type, raw in _Reader(bytes(data)).fields():
        if number == 1:
            _expect(number, wire_type, VARINT)
            p.timestamp = raw
        elif number == 2:
            _expect(number, wire_type, LEN)
            p.metrics.append(_decode_metric(raw))
        elif number == 3:
            _expect(number, wire_type, VARINT)
            p.seq = raw
        elif number == 4:
            _expect(number, wire_type, LEN)
            p.uuid = _text(raw, "uuid")
        elif number == 5:
            _expect(number, wire_type, LEN)
            p.body = raw
        else:
            p.unknown_fields.append(number)
    return p
