"""OPC UA node id parsing (property-based), namespace resolution, the Read response decoder, array elements."""

from __future__ import annotations

import base64
import datetime as dt
import struct
import uuid

import pytest
from asyncua import ua
from asyncua.ua.ua_binary import nodeid_to_binary, struct_to_binary
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.drivers.opcua.codecs import (
    DataChanges,
    _change,
    _from_datavalue,
    _pick,
    _Unusable,
    decode_publish_response,
    decode_read_response,
)
from edge_agent.drivers.opcua.config import NodeRef, format_node_id, parse_node_id

URIS = st.from_regex(r"(urn|http)(:|://)[A-Za-z0-9.;%/:#-]{1,40}", fullmatch=True)
STRING_IDS = st.text(min_size=1, max_size=60).filter(lambda s: "\x00" not in s)


@st.composite
def node_refs(draw: st.DrawFn) -> NodeRef:
    kind = draw(st.sampled_from("isgb"))
    identifier: int | str | uuid.UUID | bytes
    if kind == "i":
        identifier = draw(st.integers(0, 2**32 - 1))
    elif kind == "s":
        identifier = draw(STRING_IDS)
    elif kind == "g":
        identifier = draw(st.uuids())
    else:
        identifier = draw(st.binary(min_size=1, max_size=64))
    if draw(st.booleans()):
        return NodeRef(kind, identifier, None, draw(URIS))  # type: ignore[arg-type]
    return NodeRef(kind, identifier, draw(st.integers(0, 65535)))  # type: ignore[arg-type]


@given(node_refs())
def test_format_then_parse_round_trips(ref: NodeRef) -> None:
    parsed = parse_node_id(format_node_id(ref))
    assert (parsed.kind, parsed.identifier, parsed.ns, parsed.uri) == (ref.kind, ref.identifier, ref.ns, ref.uri)


@given(st.text(max_size=80))
def test_any_text_parses_or_says_why(text: str) -> None:
    try:
        ref = parse_node_id(text)
    except ValueError as exc:
        assert str(exc)  # a message, never another exception type
    else:
        assert format_node_id(ref)


@given(node_refs(), st.lists(URIS, max_size=5, unique=True))
def test_resolve_against_a_namespace_array(ref: NodeRef, others: list[str]) -> None:
    namespaces = ["http://opcfoundation.org/UA/", *[u for u in others if u != ref.uri]]
    if ref.uri is not None:
        assert ref.resolve(namespaces) is None
        namespaces.append(ref.uri)
    node = ref.resolve(namespaces)
    assert node is not None
    assert node.NamespaceIndex == (namespaces.index(ref.uri) if ref.uri else ref.ns)
    assert node.Identifier == ref.identifier


@pytest.mark.parametrize(
    ("text", "kind", "identifier", "ns", "uri"),
    [
        ("ns=2;s=Tank.Level", "s", "Tank.Level", 2, None),
        ("ns=2;s=a;b=c", "s", "a;b=c", 2, None),  # the identifier runs to the end
        ("ns=3;i=1001", "i", 1001, 3, None),
        ("i=2258", "i", 2258, 0, None),
        ("s=Local", "s", "Local", 0, None),
        (
            "ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
            "g",
            uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a"),
            1,
            None,
        ),
        (
            "ns=1;g={09087E75-8E5E-499B-954F-F2A9603DB28A}",
            "g",
            uuid.UUID("09087e75-8e5e-499b-954f-f2a9603db28a"),
            1,
            None,
        ),
        ("ns=4;b=M/RbKBsRVkePCePcx24oRA==", "b", base64.b64decode("M/RbKBsRVkePCePcx24oRA=="), 4, None),
        ("nsu=urn:plant:line3;s=Oven.Temp", "s", "Oven.Temp", None, "urn:plant:line3"),
        ("nsu=http://acme.com/UA/;i=5", "i", 5, None, "http://acme.com/UA/"),
        ("nsu=urn:a%3Bb;s=x", "s", "x", None, "urn:a;b"),  # ';' inside a URI is escaped as %3B
    ],
)
def test_standard_forms(text: str, kind: str, identifier: object, ns: int | None, uri: str | None) -> None:
    ref = parse_node_id(text)
    assert (ref.kind, ref.identifier, ref.ns, ref.uri) == (kind, identifier, ns, uri)
    assert str(ref) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ns=2,s=Tank", "ns= takes a namespace index (0 to 65535) followed by ;"),
        ("NS=2;S=Tank", "node id keys are lower case"),
        ("ns=2;S=Tank", "node id keys are lower case"),
        ("ns=70000;i=1", "namespace index 70000 is out of range: 0 to 65535"),
        ("ns=2;i=-1", "a numeric identifier (i=) is a whole number from 0 to 4294967295"),
        ("ns=2;i=4294967296", "a numeric identifier (i=) is a whole number from 0 to 4294967295"),
        ("ns=2;i=12a", "a numeric identifier (i=) is a whole number"),
        ("ns=2;g=not-a-guid", "a GUID identifier looks like g=09087e75-"),
        ("ns=2;g={09087e75-8e5e-499b-954f-f2a9603db28a", "a GUID identifier looks like"),
        ("ns=2;b=!!!", "an opaque identifier (b=) is non-empty base64"),
        ("ns=2;b=", "an opaque identifier (b=) is non-empty base64"),
        ("ns=2;s=", "the string identifier after s= is empty"),
        ("nsu=urn:x", "the namespace URI must be followed by ;s=…"),
        ("nsu=;s=x", "the namespace URI is empty"),
        ("Tank.Level", "is not a node id: write ns=<index>;s=<name>"),
        ("ns=2;x=1", "is not a node id"),
        ("", "is not a node id"),
    ],
)
def test_errors_say_what_would_be_right(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_node_id(text)
    assert message in str(err.value)


def test_numbers_from_yaml_need_quotes() -> None:
    with pytest.raises(ValueError, match="quote it in YAML"):
        parse_node_id(2258)


def test_long_string_identifiers_are_refused() -> None:
    parse_node_id("s=" + "x" * 4096)
    with pytest.raises(ValueError, match="at most 4096 characters"):
        parse_node_id("s=" + "x" * 4097)


# ---------------------------------------------------------------- the Read response decoder

VARIANTS = st.one_of(
    st.booleans().map(lambda v: ua.Variant(v, ua.VariantType.Boolean)),
    st.integers(-128, 127).map(lambda v: ua.Variant(v, ua.VariantType.SByte)),
    st.integers(0, 255).map(lambda v: ua.Variant(v, ua.VariantType.Byte)),
    st.integers(-(2**15), 2**15 - 1).map(lambda v: ua.Variant(v, ua.VariantType.Int16)),
    st.integers(0, 2**16 - 1).map(lambda v: ua.Variant(v, ua.VariantType.UInt16)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: ua.Variant(v, ua.VariantType.Int32)),
    st.integers(0, 2**32 - 1).map(lambda v: ua.Variant(v, ua.VariantType.UInt32)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ua.Variant(v, ua.VariantType.Int64)),
    st.integers(0, 2**64 - 1).map(lambda v: ua.Variant(v, ua.VariantType.UInt64)),
    st.floats(width=32).map(lambda v: ua.Variant(v, ua.VariantType.Float)),
    st.floats().map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    st.text(max_size=20).map(lambda v: ua.Variant(v, ua.VariantType.String)),
    st.datetimes(min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)).map(
        lambda v: ua.Variant(v, ua.VariantType.DateTime)
    ),
    st.lists(st.floats(allow_nan=False), max_size=5).map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    st.lists(st.integers(0, 255), min_size=1, max_size=5).map(lambda v: ua.Variant(v, ua.VariantType.Byte)),
    st.just(ua.Variant(ua.LocalizedText("x", "en"), ua.VariantType.LocalizedText)),
    st.just(ua.Variant(None)),
)
STATUSES = st.sampled_from(
    [
        ua.StatusCodes.Good,
        ua.StatusCodes.UncertainLastUsableValue,
        ua.StatusCodes.BadNodeIdUnknown,
        ua.StatusCodes.GoodOverload,
    ]
)
TIMES = st.one_of(st.none(), st.just(dt.datetime(2024, 1, 1, tzinfo=dt.UTC)))


@st.composite
def data_values(draw: st.DrawFn) -> ua.DataValue:
    status = draw(STATUSES)
    variant = draw(VARIANTS) if status >> 31 == 0 else ua.Variant(None)
    return ua.DataValue(
        variant,
        StatusCode=ua.StatusCode(status),
        SourceTimestamp=draw(TIMES),
        ServerTimestamp=draw(TIMES),
        SourcePicoseconds=draw(st.one_of(st.none(), st.integers(0, 9999))),
    )


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=200)
@given(st.lists(data_values(), max_size=8))
def test_decoder_agrees_with_asyncua(values: list[ua.DataValue]) -> None:
    response = ua.ReadResponse()
    response.Results = values
    service, got = decode_read_response(struct_to_binary(response))
    assert service == 0
    want = [_from_datavalue(dv) for dv in values]
    assert len(got) == len(want)
    for (s1, t1, v1, a1), (s2, t2, v2, a2) in zip(got, want, strict=True):
        assert (s1, t1, a1) == (s2, t2, a2)
        v1 = v1.tolist() if hasattr(v1, "tolist") else v1
        if t1 == 21:  # LocalizedText goes through asyncua's own decoder
            assert v1 == v2
        elif t1 == 13 and isinstance(v1, float) and isinstance(v2, float):  # 100 ns ticks vs datetime: float rounding
            assert abs(v1 - v2) < 1e-5
        else:
            assert same(v1, v2), (t1, v1, v2)


def test_decoder_reports_the_service_result() -> None:
    response = ua.ReadResponse()
    response.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadTooManyOperations)
    service, got = decode_read_response(struct_to_binary(response))
    assert service == ua.StatusCodes.BadTooManyOperations and got == []


# ---------------------------------------------------------------- the Publish response decoder

TS = st.one_of(
    st.none(),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=st.just(dt.UTC)),
)


@st.composite
def changes(draw: st.DrawFn) -> ua.MonitoredItemNotification:
    status = draw(STATUSES)
    value = draw(VARIANTS) if status >> 31 == 0 else ua.Variant(None)
    # no picoseconds: asyncua writes them after both timestamps, the spec between them (tested below)
    dv = ua.DataValue(value, StatusCode=ua.StatusCode(status), SourceTimestamp=draw(TS), ServerTimestamp=draw(TS))
    return ua.MonitoredItemNotification(ClientHandle=draw(st.integers(0, 2**32 - 1)), Value=dv)


@settings(max_examples=150)
@given(st.lists(changes(), max_size=6), st.integers(1, 2**32 - 1), st.booleans())
def test_publish_decoder_agrees_with_asyncua(
    items: list[ua.MonitoredItemNotification], seq: int, status_change: bool
) -> None:
    response = ua.PublishResponse()
    response.Parameters.SubscriptionId = 7
    response.Parameters.AvailableSequenceNumbers = [seq]
    response.Parameters.NotificationMessage.SequenceNumber = seq
    data: list[object] = [ua.DataChangeNotification(MonitoredItems=items)]
    if status_change:
        data.append(ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout)))
    response.Parameters.NotificationMessage.NotificationData = data  # type: ignore[assignment]
    got = decode_publish_response(struct_to_binary(response)).Parameters
    assert got.SubscriptionId == 7 and got.NotificationMessage.SequenceNumber == seq
    changes_got = got.NotificationMessage.NotificationData[0]
    assert isinstance(changes_got, DataChanges)
    for mine, theirs in zip(changes_got.items, [_change(i) for i in items], strict=True):
        assert mine[:3] == theirs[:3] and mine[4] == theirs[4]
        assert same(mine[3].tolist() if hasattr(mine[3], "tolist") else mine[3], theirs[3]) or mine[2] in (13, 21)
        for a, b in zip(mine[5:], theirs[5:], strict=True):
            assert (a is None and b is None) or abs(a - b) < 1e-5  # type: ignore[operator]
    if status_change:
        other = got.NotificationMessage.NotificationData[1]
        assert isinstance(other, ua.StatusChangeNotification) and other.Status.value == ua.StatusCodes.BadTimeout


def test_publish_decoder_reads_picoseconds_in_the_spec_order() -> None:
    src, srv = 133_000_000_000_000_000, 133_000_000_010_000_000  # 100 ns ticks since 1601
    dv = bytes([0x3F, 11]) + struct.pack("<d", 1.5) + struct.pack("<I", 0)
    dv += struct.pack("<q", src) + struct.pack("<H", 7) + struct.pack("<q", srv) + struct.pack("<H", 9)
    body = struct.pack("<i", 1) + struct.pack("<I", 42) + dv + struct.pack("<i", 0)  # one item, no diagnostics
    extension = nodeid_to_binary(ua.FourByteNodeId(ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary))
    extension += b"\x01" + struct.pack("<i", len(body)) + body
    response = ua.PublishResponse()
    head = struct_to_binary(response)
    head = head[: len(head) - len(struct_to_binary(response.Parameters))]  # type id and response header
    params = struct.pack("<I", 3) + struct.pack("<i", 0) + b"\x00" + struct.pack("<I", 5) + struct.pack("<q", 0)
    params += struct.pack("<i", 1) + extension + struct.pack("<i", 0) + struct.pack("<i", 0)
    got = decode_publish_response(head + params).Parameters
    (item,) = got.NotificationMessage.NotificationData[0].items
    assert item[0] == 42 and item[3] == 1.5
    assert item[5] == (src - 116_444_736_000_000_000) / 1e7 and item[6] == (srv - 116_444_736_000_000_000) / 1e7


def test_array_element_from_a_ranged_or_a_whole_answer() -> None:
    assert _pick([7.0], 3, ranged=True) == 7.0  # the server applied IndexRange "3"
    assert _pick([1.0, 2.0, 3.0, 4.0], 3, ranged=True) == 4.0  # it ignored the range and sent the whole array
    assert _pick([7.0], 0, ranged=False) == 7.0
    with pytest.raises(_Unusable, match="has no element 3: the array has 1"):
        _pick([7.0], 3, ranged=False)  # a one-element array, not element 3, when no range was asked for
    with pytest.raises(_Unusable, match="has no element 5: the array has 4"):
        _pick([1.0, 2.0, 3.0, 4.0], 5, ranged=True)
    with pytest.raises(_Unusable, match="set index: N"):
        _pick([1.0, 2.0], None, ranged=False)
