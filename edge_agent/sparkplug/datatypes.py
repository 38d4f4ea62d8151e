"""Sparkplug B 3.0 data types (the numbers in Metric.datatype), the value field each uses, and the agent's tag types.

Plain data: this module imports nothing beyond the standard library.
"""

from __future__ import annotations

from enum import IntEnum


class DataType(IntEnum):
    """Sparkplug B DataType numbers (specification 3.0, section 6.4.16)."""

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
    INT8ARRAY = 22
    INT16ARRAY = 23
    INT32ARRAY = 24
    INT64ARRAY = 25
    UINT8ARRAY = 26
    UINT16ARRAY = 27
    UINT32ARRAY = 28
    UINT64ARRAY = 29
    FLOATARRAY = 30
    DOUBLEARRAY = 31
    BOOLEANARRAY = 32
    STRINGARRAY = 33
    DATETIMEARRAY = 34


# the oneof field of Metric (and of PropertyValue, DataSetValue, Template.Parameter) that holds each type's value
_INT = (DataType.INT8, DataType.INT16, DataType.INT32, DataType.UINT8, DataType.UINT16, DataType.UINT32)
_LONG = (DataType.INT64, DataType.UINT64, DataType.DATETIME)
VALUE_FIELD: dict[DataType, str] = {
    **dict.fromkeys(_INT, "int_value"),
    **dict.fromkeys(_LONG, "long_value"),
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    **dict.fromkeys((DataType.STRING, DataType.TEXT, DataType.UUID), "string_value"),
    **dict.fromkeys((DataType.BYTES, DataType.FILE), "bytes_value"),
    **dict.fromkeys(range(DataType.INT8ARRAY, DataType.DATETIMEARRAY + 1), "bytes_value"),  # type: ignore[arg-type]
    DataType.DATASET: "dataset_value",
    DataType.TEMPLATE: "template_value",
}

# bits of the signed integer types: their negative values travel as two's complement of that width in the
# unsigned int_value/long_value field (as Eclipse Tahu writes them; a Java host casts them back)
SIGNED_BITS: dict[DataType, int] = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}

# the agent's tag types (Modbus/codecs names, S7 names as TIA Portal writes them) → Sparkplug types
_TAG_TYPES: dict[str, DataType] = {
    "bool": DataType.BOOLEAN,
    "int8": DataType.INT8,
    "sint": DataType.INT8,
    "int16": DataType.INT16,
    "int": DataType.INT16,
    "int32": DataType.INT32,
    "dint": DataType.INT32,
    "int64": DataType.INT64,
    "lint": DataType.INT64,
    "uint8": DataType.UINT8,
    "byte": DataType.UINT8,
    "usint": DataType.UINT8,
    "uint16": DataType.UINT16,
    "uint": DataType.UINT16,
    "word": DataType.UINT16,
    "uint32": DataType.UINT32,
    "udint": DataType.UINT32,
    "dword": DataType.UINT32,
    "uint64": DataType.UINT64,
    "ulint": DataType.UINT64,
    "lword": DataType.UINT64,
    "float32": DataType.FLOAT,
    "real": DataType.FLOAT,
    "float64": DataType.DOUBLE,
    "lreal": DataType.DOUBLE,
    "string": DataType.STRING,
    "char": DataType.STRING,
}


def from_tag_type(type_name: str | None) -> DataType:
    """The Sparkplug type for a tag type name (`float32`, `REAL`, `string[16]`…); Double when unknown or unset.

    A tag without a declared type (an OPC UA node) carries the agent's numbers, which are doubles.
    """
    if not type_name:
        return DataType.DOUBLE
    return _TAG_TYPES.get(type_name.split("[", 1)[0].strip().lower(), DataType.DOUBLE)
