"""The Sparkplug B Payload protobuf schema, written from the specification (3.0, sparkplug_b.proto), and values.

Why a descriptor built here rather than generated `_pb2` code: no `protoc` is installed, and generated code
is tied to the protobuf runtime that generated it (gencode/runtime version checks since protobuf 5.26),
while a FileDescriptorProto built at import and turned into classes by `message_factory.GetMessageClass`
works the same on every protobuf release since 4.22. The schema is the specification's, field for field
(proto2, package `org.eclipse.tahu.protobuf`, extension ranges included), so any Sparkplug decoder reads
what these classes write, and these classes read what any Sparkplug encoder writes.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from edge_agent.sparkplug.datatypes import SIGNED_BITS, VALUE_FIELD, DataType

PACKAGE = "org.eclipse.tahu.protobuf"
_MAX = 536870912  # protobuf's highest field number + 1: `extensions N to max`

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}

# (name, number, type, label) per field; a type that is not a scalar names a message of the schema;
# label "oneof" puts the field in the message's `value` oneof (optional inside it)
_P = ".org.eclipse.tahu.protobuf.Payload"
_ONEOF_SCALARS = [
    ("int_value", "uint32"),
    ("long_value", "uint64"),
    ("float_value", "float"),
    ("double_value", "double"),
    ("boolean_value", "bool"),
    ("string_value", "string"),
]


def _message(
    name: str, fields: list[tuple[str, int, str, str]], ext_from: int | None, nested: list[Any] | None = None
) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    has_oneof = False
    for fname, number, ftype, label in fields:
        field = msg.field.add(name=fname, number=number)
        field.label = _F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL
        if ftype in _TYPES:
            field.type = _TYPES[ftype]
        else:
            field.type = _F.TYPE_MESSAGE
            field.type_name = ftype
        if label == "oneof":
            field.oneof_index = 0
            has_oneof = True
    if has_oneof:
        msg.oneof_decl.add(name="value")
    if ext_from is not None:
        msg.extension_range.add(start=ext_from, end=_MAX)
    msg.nested_type.extend(nested or [])
    return msg


def _extension(name: str) -> descriptor_pb2.DescriptorProto:
    return _message(name, [], 1)


def _oneof(first: int, extra: list[tuple[str, str]], ext_type: str) -> list[tuple[str, int, str, str]]:
    """The value oneof: the six scalars from field number `first`, then `extra`, then the extension message."""
    scalars = [(n, first + i, t, "oneof") for i, (n, t) in enumerate(_ONEOF_SCALARS)]
    more = [(n, first + len(scalars) + i, t, "oneof") for i, (n, t) in enumerate(extra)]
    return [*scalars, *more, ("extension_value", first + len(scalars) + len(extra), ext_type, "oneof")]


def _file() -> descriptor_pb2.FileDescriptorProto:
    parameter = _message(
        "Parameter",
        [
            ("name", 1, "string", "optional"),
            ("type", 2, "uint32", "optional"),
            *_oneof(3, [], f"{_P}.Template.Parameter.ParameterValueExtension"),
        ],
        None,
        [_extension("ParameterValueExtension")],
    )
    template = _message(
        "Template",
        [
            ("version", 1, "string", "optional"),
            ("metrics", 2, f"{_P}.Metric", "repeated"),
            ("parameters", 3, f"{_P}.Template.Parameter", "repeated"),
            ("template_ref", 4, "string", "optional"),
            ("is_definition", 5, "bool", "optional"),
        ],
        6,
        [parameter],
    )
    dataset_value = _message(
        "DataSetValue",
        _oneof(1, [], f"{_P}.DataSet.DataSetValue.DataSetValueExtension"),
        None,
        [_extension("DataSetValueExtension")],
    )
    row = _message("Row", [("elements", 1, f"{_P}.DataSet.DataSetValue", "repeated")], 2)
    dataset = _message(
        "DataSet",
        [
            ("num_of_columns", 1, "uint64", "optional"),
            ("columns", 2, "string", "repeated"),
            ("types", 3, "uint32", "repeated"),
            ("rows", 4, f"{_P}.DataSet.Row", "repeated"),
        ],
        5,
        [dataset_value, row],
    )
    property_value = _message(
        "PropertyValue",
        [
            ("type", 1, "uint32", "optional"),
            ("is_null", 2, "bool", "optional"),
            *_oneof(
                3,
                [("propertyset_value", f"{_P}.PropertySet"), ("propertysets_value", f"{_P}.PropertySetList")],
                f"{_P}.PropertyValue.PropertyValueExtension",
            ),
        ],
        None,
        [_extension("PropertyValueExtension")],
    )
    property_set = _message(
        "PropertySet", [("keys", 1, "string", "repeated"), ("values", 2, f"{_P}.PropertyValue", "repeated")], 3
    )
    property_set_list = _message("PropertySetList", [("propertyset", 1, f"{_P}.PropertySet", "repeated")], 2)
    metadata = _message(
        "MetaData",
        [
            ("is_multi_part", 1, "bool", "optional"),
            ("content_type", 2, "string", "optional"),
            ("size", 3, "uint64", "optional"),
            ("seq", 4, "uint64", "optional"),
            ("file_name", 5, "string", "optional"),
            ("file_type", 6, "string", "optional"),
            ("md5", 7, "string", "optional"),
            ("description", 8, "string", "optional"),
        ],
        9,
    )
    metric = _message(
        "Metric",
        [
            ("name", 1, "string", "optional"),
            ("alias", 2, "uint64", "optional"),
            ("timestamp", 3, "uint64", "optional"),
            ("datatype", 4, "uint32", "optional"),
            ("is_historical", 5, "bool", "optional"),
            ("is_transient", 6, "bool", "optional"),
            ("is_null", 7, "bool", "optional"),
            ("metadata", 8, f"{_P}.MetaData", "optional"),
            ("properties", 9, f"{_P}.PropertySet", "optional"),
            *_oneof(
                10,
                [("bytes_value", "bytes"), ("dataset_value", f"{_P}.DataSet"), ("template_value", f"{_P}.Template")],
                f"{_P}.Metric.MetricValueExtension",
            ),
        ],
        None,
        [_extension("MetricValueExtension")],
    )
    payload = _message(
        "Payload",
        [
            ("timestamp", 1, "uint64", "optional"),
            ("metrics", 2, f"{_P}.Metric", "repeated"),
            ("seq", 3, "uint64", "optional"),
            ("uuid", 4, "string", "optional"),
            ("body", 5, "bytes", "optional"),
        ],
        6,
        [template, dataset, property_value, property_set, property_set_list, metadata, metric],
    )
    return descriptor_pb2.FileDescriptorProto(
        name="edge_agent/sparkplug_b.proto", package=PACKAGE, syntax="proto2", message_type=[payload]
    )


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def _class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


Payload: Any = _class("Payload")
Metric: Any = _class("Payload.Metric")
PropertySet: Any = _class("Payload.PropertySet")
PropertyValue: Any = _class("Payload.PropertyValue")
MetaData: Any = _class("Payload.MetaData")
DataSet: Any = _class("Payload.DataSet")
Template: Any = _class("Payload.Template")


def set_value(target: Any, datatype: DataType, value: Any) -> None:
    """Write `value` into a Metric or PropertyValue's field for `datatype`; None sets is_null.

    Signed integers go as two's complement of their width; a non-finite number given to an integer
    type is null (it has no integer value).
    """
    field = VALUE_FIELD.get(datatype)
    if value is None or field is None:
        target.is_null = True
        return
    if field in ("int_value", "long_value"):
        if isinstance(value, float) and not math.isfinite(value):
            target.is_null = True
            return
        number = int(value)
        bits = SIGNED_BITS.get(datatype)
        if bits is not None and number < 0:
            number += 1 << bits
        setattr(target, field, number)
    elif field == "boolean_value":
        target.boolean_value = bool(value)
    elif field in ("float_value", "double_value"):
        setattr(target, field, float(value))
    elif field == "string_value":
        target.string_value = str(value)
    elif field == "bytes_value":
        target.bytes_value = bytes(value)
    else:  # a DataSet or Template message
        getattr(target, field).CopyFrom(value)


def get_value(source: Any, datatype: DataType | int | None = None) -> Any:
    """The value a Metric or PropertyValue holds (None when null or unset); signed types read back negative.

    `datatype` defaults to the message's own `datatype` (Metric) or `type` (PropertyValue) field: a DDATA
    metric sent by alias carries no datatype, so the caller passes the one its DBIRTH gave.
    """
    if source.HasField("is_null") and source.is_null:
        return None
    field = source.WhichOneof("value")
    if field is None:
        return None
    value = getattr(source, field)
    if datatype is None:
        datatype = source.datatype if hasattr(source, "datatype") else source.type
    bits = SIGNED_BITS.get(DataType(datatype)) if datatype in DataType._value2member_map_ else None
    if bits is not None and field in ("int_value", "long_value"):
        # mask to the type's width first: Java/Ignition nodes sign-extend Int8/Int16 to 32 bits, Tahu's Python does not
        value &= (1 << bits) - 1
        if value >= 1 << (bits - 1):
            value -= 1 << bits
    return value


def property_set(items: dict[str, tuple[DataType, Any]]) -> Any:
    """A PropertySet of (type, value) per key, e.g. {"engUnit": (DataType.STRING, "°C")}."""
    props = PropertySet()
    for key, (datatype, value) in items.items():
        props.keys.append(key)
        pv = props.values.add()
        pv.type = int(datatype)
        set_value(pv, datatype, value)
    return props


def properties_dict(props: Any) -> dict[str, Any]:
    """A PropertySet's keys and values as a dict (values decoded by their own type)."""
    return {k: get_value(v) for k, v in zip(props.keys, props.values, strict=False)}
