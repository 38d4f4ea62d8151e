"""Binary decoders of Read and Publish answers, and the conversion of OPC UA values into samples.

Read and Publish answers are decoded here from the wire bytes, straight into the batch's columns:
asyncua's generic codec builds a DataValue, a Variant and two datetimes per value, ~15 µs a value.
Scalars of the builtin types are unpacked here; anything else goes through asyncua's decoders.
"""

from __future__ import annotations

import datetime as dt
import math
import struct
from dataclasses import dataclass
from typing import Any

from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua.ua_binary import (
    extensionobject_from_binary,
    nodeid_from_binary,
    nodeid_to_binary,
    struct_from_binary,
    variant_from_binary,
)

from edge_agent.types import Value

_EPOCH_TICKS = 116_444_736_000_000_000  # 100 ns ticks from 1601-01-01 (OPC UA's epoch) to 1970-01-01
_KIND = {1: "bool", 2: "int", 3: "int", 4: "int", 5: "int", 6: "int", 7: "int", 8: "int", 9: "int", 10: "float"}
_KIND[11] = "float"
_TYPE_NAMES = {t.value: t.name for t in ua.VariantType}
_EXACT_LIMIT = 2**53  # integers beyond this do not survive float64


class _Unusable(Exception):
    """A value with a good status that cannot become a sample (an array, a structure, …).

    `key` names the trouble without the details that change from value to value (an array's
    length): a tag is logged again only when its key changes, not at every new length.
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key or message


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pick(v: Any, index: int | None, ranged: bool) -> Any:
    """One element of an array value, for a tag with `index`; `ranged`: the request carried IndexRange `index`."""
    if index is None:
        raise _Unusable(
            f"is an array of {len(v)} values; set index: N on the tag to read one element", "is an array, no index"
        )
    n = len(v)
    if n == 1 and ranged:
        return v[0]  # the server applied the IndexRange and sent just that element
    if index < n:
        return v[index]  # the whole array: the server ignored the IndexRange (or none was asked for)
    raise _Unusable(f"has no element {index}: the array has {n}", f"has no element {index}")


def _convert(vt: int, v: Any) -> tuple[float, Value | None, str]:
    """(float for the buffers, exact value or None, kind) of one scalar; DateTime arrives as epoch seconds."""
    kind = _KIND.get(vt)
    if kind == "float":
        return float(v), None, kind
    if kind == "int":
        return float(v), (int(v) if not -_EXACT_LIMIT <= v <= _EXACT_LIMIT else None), kind
    if kind == "bool":
        return (1.0 if v else 0.0), None, kind
    if vt == 12:
        if v is None:
            raise _Unusable("is a null string")
        return math.nan, str(v), "str"
    if vt == 13:
        if v is None or v <= -11_644_473_600.0:  # DateTime 0: OPC UA's null time
            raise _Unusable("is a null DateTime")
        return float(v), _iso(v), "str"
    if vt == 0:
        raise _Unusable("has no value (null)")
    raise _Unusable(f"has type {_TYPE_NAMES.get(vt, vt)}, not a number, boolean, string or DateTime")


def _from_datavalue(dv: ua.DataValue) -> tuple[int, int, Any, bool]:
    """(status, variant type, value, is_array) of a decoded DataValue; DateTime as epoch seconds."""
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    var = dv.Value
    if var is None or var.VariantType is None:
        return status, 0, None, False
    vt, v = var.VariantType.value, var.Value
    if vt == 13:
        v = [_epoch(x) for x in v] if var.is_array else _epoch(v)
    return status, vt, v, bool(var.is_array)


def _epoch(d: dt.datetime | None) -> float | None:
    if d is None:
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return d.timestamp()


# fixed-size scalars on the wire, by variant type id (13: DateTime, 100 ns ticks since 1601)
_FIXED: dict[int, struct.Struct] = {
    vt: struct.Struct(fmt)
    for vt, fmt in enumerate(("<?", "<b", "<B", "<h", "<H", "<i", "<I", "<q", "<Q", "<f", "<d", "", "<q"), start=1)
    if fmt
}
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_READ_REQUEST = nodeid_to_binary(ua.FourByteNodeId(ua.Int32(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary)))
_PUBLISH_REQUEST = nodeid_to_binary(ua.FourByteNodeId(ua.Int32(ua.ObjectIds.PublishRequest_Encoding_DefaultBinary)))
_PUBLISH_RESPONSE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.PublishResponse_Encoding_DefaultBinary))
_DATA_CHANGE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary))
_READ_RESPONSE = ua.FourByteNodeId(ua.Int32(ua.ObjectIds.ReadResponse_Encoding_DefaultBinary))
# DataValue fields after the variant, by mask bit: status, source ts, server ts, source ps, server ps
_TAIL_BYTES = [sum(n for bit, n in ((2, 4), (4, 8), (8, 8), (16, 2), (32, 2)) if m & bit) for m in range(64)]


def _variant(raw: bytes, pos: int) -> tuple[int, Any, bool, int]:
    """(variant type, value, is_array, next position) of the Variant at `pos`; DateTime as epoch seconds.

    Scalars of the builtin types are unpacked here; anything else (arrays, structures, localized
    text, …) goes through asyncua's variant decoder.
    """
    enc = raw[pos]
    vt = enc & 0x3F
    if enc & 0xC0 == 0:
        s = _FIXED.get(vt)
        if s is not None:
            v = s.unpack_from(raw, pos + 1)[0]
            if vt == 13:
                v = (v - _EPOCH_TICKS) / 1e7 if v > 0 else None
            return vt, v, False, pos + 1 + s.size
        if vt == 12:
            (n,) = _I32.unpack_from(raw, pos + 1)
            if n < 0:
                return vt, None, False, pos + 5
            return vt, raw[pos + 5 : pos + 5 + n].decode("utf-8", "replace"), False, pos + 5 + n
    vbuf = Buffer(raw, pos)
    var = variant_from_binary(vbuf)
    _, vt, v, is_array = _from_datavalue(ua.DataValue(var))
    return vt, v, is_array, vbuf.cur_pos


def _ticks(raw: bytes, pos: int) -> float | None:
    (t,) = _I64.unpack_from(raw, pos)
    return (t - _EPOCH_TICKS) / 1e7 if t > 0 else None


def _header(raw: bytes, expected: ua.NodeId) -> tuple[int, int]:
    """Check the type id, decode the ResponseHeader: (service result, position after it)."""
    buf = Buffer(raw)
    type_id = nodeid_from_binary(buf)
    if type_id != expected:
        raise ua.UaError(f"expected type {expected}, got {type_id}")
    header = struct_from_binary(ua.ResponseHeader, buf)
    return header.ServiceResult.value, buf.cur_pos


def decode_read_response(raw: bytes) -> tuple[int, list[tuple[int, int, Any, bool]]]:
    """Decode a Read response body: (service result, [(status, variant type, value, is_array)] per node).

    Timestamps are skipped: polled values take the read time.
    """
    service, pos = _header(raw, _READ_RESPONSE)
    (count,) = _I32.unpack_from(raw, pos)
    pos += 4
    out: list[tuple[int, int, Any, bool]] = []
    append = out.append
    tail = _TAIL_BYTES
    variant = _variant
    for _ in range(max(count, 0)):
        mask = raw[pos]
        pos += 1
        vt, v, is_array = 0, None, False
        if mask & 1:
            vt, v, is_array, pos = variant(raw, pos)
        status = 0
        if mask & 2:
            (status,) = _U32.unpack_from(raw, pos)
        pos += tail[mask & 0x3F]
        append((status, vt, v, is_array))
    return service, out


Change = tuple[
    int, int, int, Any, bool, float | None, float | None
]  # handle, status, type, value, array, source, server


@dataclass
class DataChanges:
    """The monitored items of one DataChangeNotification, decoded here."""

    items: list[Change]


@dataclass
class _Message:
    SequenceNumber: int
    NotificationData: list[Any]


@dataclass
class _PublishResult:
    SubscriptionId: int
    NotificationMessage: _Message


@dataclass
class _PublishResponse:
    Parameters: _PublishResult  # the shape asyncua's publish loop reads


def decode_publish_response(raw: bytes) -> _PublishResponse:
    """Decode a Publish response body; data changes become DataChanges, other notifications asyncua objects."""
    service, pos = _header(raw, _PUBLISH_RESPONSE)
    if service >> 31:
        raise ua.UaStatusCodeError(service)  # BadTimeout, BadNoSubscription: the publish loop knows these
    (sub_id,) = _U32.unpack_from(raw, pos)
    (n,) = _I32.unpack_from(raw, pos + 4)
    pos += 8 + 4 * max(n, 0) + 1  # available sequence numbers, MoreNotifications
    (seq,) = _U32.unpack_from(raw, pos)
    (n_data,) = _I32.unpack_from(raw, pos + 12)  # after the PublishTime
    pos += 16
    data: list[Any] = []
    for _ in range(max(n_data, 0)):
        start = pos
        tbuf = Buffer(raw, pos)
        type_id = nodeid_from_binary(tbuf)
        pos = tbuf.cur_pos
        if raw[pos] != 1 or type_id != _DATA_CHANGE:
            ebuf = Buffer(raw, start)
            data.append(extensionobject_from_binary(ebuf))
            pos = ebuf.cur_pos
            continue
        (length,) = _I32.unpack_from(raw, pos + 1)
        end = pos + 5 + length
        (m,) = _I32.unpack_from(raw, pos + 5)
        pos += 9
        items: list[Change] = []
        for _ in range(max(m, 0)):
            (handle,) = _U32.unpack_from(raw, pos)
            mask = raw[pos + 4]
            pos += 5
            vt, v, is_array = 0, None, False
            if mask & 1:
                vt, v, is_array, pos = _variant(raw, pos)
            status = src = srv = None
            if mask & 2:
                (status,) = _U32.unpack_from(raw, pos)
                pos += 4
            # OPC UA Part 6 order: source timestamp, source picoseconds, server timestamp, server picoseconds
            if mask & 4:
                src = _ticks(raw, pos)
                pos += 8
            if mask & 16:
                pos += 2
            if mask & 8:
                srv = _ticks(raw, pos)
                pos += 8
            if mask & 32:
                pos += 2
            items.append((handle, status or 0, vt, v, is_array, src, srv))
        data.append(DataChanges(items))
        pos = end
    return _PublishResponse(_PublishResult(sub_id, _Message(seq, data)))


def _change(item: ua.MonitoredItemNotification) -> Change:
    """The same tuple from an item asyncua decoded (its fallback path, and inform_subscriptions)."""
    status, vt, v, is_array = _from_datavalue(item.Value)
    return (
        item.ClientHandle,
        status,
        vt,
        v,
        is_array,
        _epoch(item.Value.SourceTimestamp),
        _epoch(item.Value.ServerTimestamp),
    )


def _status_name(code: int) -> str:
    return ua.StatusCode(ua.UInt32(code)).name


def _not_array(index: int | None) -> Any:
    raise _Unusable(f"is not an array, but the tag asks for index {index}")
