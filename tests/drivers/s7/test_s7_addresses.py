"""S7 addresses, types and TSAPs (properties and messages), type/size rules, overlaps, request packing, byte codec."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.drivers.codecs import ByteDecoder, ByteField
from edge_agent.drivers.s7.config import (
    LAST_BYTE,
    MAX_STRING,
    Area,
    S7Address,
    S7Device,
    S7Planner,
    S7Tag,
    S7Type,
    Width,
    parse_address,
    parse_tsap,
    parse_type,
)
from edge_agent.drivers.s7.planner import item_cost, items_limit, pack_items, payload_limit, plan_group


@st.composite
def addresses(draw: st.DrawFn) -> S7Address:
    area = draw(st.sampled_from(list(Area)))
    width = draw(st.sampled_from(list(Width)))
    return S7Address(
        area,
        draw(st.integers(1, 65535)) if area is Area.DB else 0,
        draw(st.integers(0, LAST_BYTE)),
        width,
        draw(st.integers(0, 7)) if width is Width.BIT else None,
    )


@given(addresses())
def test_canonical_text_round_trips(a: S7Address) -> None:
    parsed = parse_address(a.canonical)
    assert parsed == a
    assert str(parsed) == parsed.canonical == a.canonical


@given(addresses(), st.booleans(), st.booleans())
def test_spellings_of_one_address_parse_alike(a: S7Address, lower: bool, percent: bool) -> None:
    text = a.canonical
    if a.area is not Area.DB and a.area is not Area.MARKER:
        text = ("E" if a.area is Area.INPUT else "A") + text[1:]  # German mnemonics
    text = ("%" if percent else "") + (text.lower() if lower else text)
    assert parse_address(f"  {text} ") == a


@given(st.text(max_size=40))
def test_junk_text_never_crashes(text: str) -> None:
    try:
        a = parse_address(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert parse_address(a.canonical) == a


@given(st.from_regex(r"%?(DB\d{0,7}\.DB[A-Z]?|[MIEQAXZ])[XBWDL]?\d{0,7}(\.\d{0,3})?", fullmatch=True))
def test_near_miss_addresses_never_crash(text: str) -> None:
    try:
        a = parse_address(text)
    except ValueError as exc:
        assert text.strip() in str(exc) or "not an address" in str(exc)
    else:
        assert a.byte <= LAST_BYTE and (a.bit is None) == (a.width is not Width.BIT)


@given(st.one_of(st.integers(), st.floats(), st.none(), st.binary(), st.lists(st.integers()), st.booleans()))
def test_non_text_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="not an address"):
        parse_address(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("DB0.DBW0", "data blocks are numbered 1 to 65535"),
        ("DB1.DBQ4", "after DB1. write DBX (bit), DBB (byte), DBW (word) or DBD (double word)"),
        ("M5", "'M5' names no size: write M5.0 (bit), MB5 (byte), MW5 (word) or MD5 (double word)"),
        ("DB1.DBX4", "names a bit: add the bit number, e.g. DB1.DBX4.0"),
        ("E2", "write E2.0 (bit), EB2 (byte)"),
        ("DB1.DBX4.8", "a byte has bits 0 to 7"),
        ("DB1.DBW4.1", "only bit addresses take a bit number (write DB1.DBX4.1)"),
        ("MW4.1", "only bit addresses take a bit number (write M4.1)"),
        ("MW70000", "byte offsets run from 0 to 65535"),
        ("40001", "'40001' is not an address: write a Siemens address"),
        ("DB1,REAL4", "is not an address"),
    ],
)
def test_address_messages(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_address(text)
    assert message in str(err.value)


@pytest.mark.parametrize("name", [t.value for t in S7Type if t is not S7Type.STRING])
def test_type_names_round_trip_in_any_case(name: str) -> None:
    assert str(parse_type(name)) == name
    assert parse_type(name.upper()) == parse_type(name.capitalize()) == parse_type(name)


@given(st.integers(1, MAX_STRING))
def test_string_types(n: int) -> None:
    t = parse_type(f"String[{n}]")
    assert (t.type, t.length, t.nbytes, str(t)) == (S7Type.STRING, n, n + 2, f"string[{n}]")
    assert parse_type(str(t)) == t


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("string[0]", "holds 1 to 254 characters"),
        ("string[255]", "holds 1 to 254 characters"),
        ("float32", "'float32' is not an S7 type (real is the S7 name)"),
        ("uint16", "(uint or word is the S7 name)"),
        ("wstring", "write bool, byte, char"),
    ],
)
def test_type_messages(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        parse_type(text)
    assert message in str(err.value)


def test_plain_string_is_string_254_as_in_tia_portal() -> None:
    assert parse_type("STRING").length == 254


@pytest.mark.parametrize(("value", "tsap"), [("03.01", 0x0301), ("10:02", 0x1002), ("0x0100", 0x0100), (770, 770)])
def test_tsaps(value: object, tsap: int) -> None:
    assert parse_tsap(value) == tsap


@pytest.mark.parametrize("value", ["x", "0x10000", 70000, -1, True, "3.1.1", None])
def test_bad_tsaps(value: object) -> None:
    with pytest.raises(ValueError, match="TSAP"):
        parse_tsap(value)


def tag(address: str, type_: str | None = None, **extra: object) -> S7Tag:
    return S7Tag.model_validate({"name": "t", "address": address, "type": type_, **extra})


@pytest.mark.parametrize(
    ("address", "types"),
    [
        ("DB1.DBX0.0", [None, "bool"]),
        ("DB1.DBB0", ["byte", "char", "sint", "usint", "lreal", "lint", "ulint", "lword", "string[10]", "string"]),
        ("DB1.DBW0", ["int", "uint", "word"]),
        ("MD4", ["real", "dint", "udint", "dword"]),
    ],
)
def test_types_that_fit_their_address(address: str, types: list[str | None]) -> None:
    for t in types:
        assert tag(address, t).address.canonical == address


@pytest.mark.parametrize(
    ("address", "type_", "extra", "message"),
    [
        ("DB1.DBD0", "lreal", {}, "lreal takes 8 bytes: address it by its first byte, DB1.DBB0"),
        ("DB1.DBW0", "real", {}, "real is 4 bytes but DB1.DBW0 is 2: write DB1.DBD0"),
        ("DB1.DBB0", "int", {}, "int is 2 bytes but DB1.DBB0 is 1: write DB1.DBW0"),
        ("DB1.DBD0", "string[8]", {}, "string[8] takes 10 bytes: address it by its first byte, DB1.DBB0"),
        ("DB1.DBX0.3", "int", {}, "DB1.DBX0.3 names one bit: type must be bool, not int"),
        ("QB2", "bool", {}, "bool needs a bit address such as Q2.0"),
        ("DB1.DBD0", None, {}, "required for DB1.DBD0: real, dint, udint or dword"),
        ("MW65535", "int", {}, "MW65535 with 2 bytes runs past byte 65535"),
        ("DB1.DBB0", "string[4]", {"scale": 2}, "scale and offset apply to numbers, not to string[4]"),
        ("DB1.DBW0", "int", {"scale": 0}, "scale 0 would turn every value into the offset"),
    ],
)
def test_types_that_do_not_fit(address: str, type_: str | None, extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        tag(address, type_, **extra)
    assert message in str(err.value)


def device(*tags: tuple[str, str | None], **fields: object) -> S7Device:
    return S7Device.model_validate(
        {
            "type": "s7",
            "name": "plc",
            "host": "127.0.0.1",
            "tags": [{"name": f"t{i}", "address": a, "type": t} for i, (a, t) in enumerate(tags)],
            **fields,
        }
    )


def test_overlaps() -> None:
    dev = device(
        ("DB1.DBB0", "string[10]"),  # bytes 0..11
        ("DB1.DBW4", "int"),  # inside the string
        ("DB1.DBX10.0", None),  # inside the string too (not only next to the previous tag)
        ("DB1.DBX20.0", None),
        ("DB1.DBX20.1", None),  # another bit of the same byte: fine
        ("DB1.DBX20.1", None),  # the same bit twice
        ("DB2.DBW4", "int"),  # another DB: fine
        ("MB20", "byte"),
        ("M20.3", None),  # a bit of a byte tag
    )
    assert [(loc[1], msg) for loc, msg in dev.check()] == [
        (1, "DB1.DBW4 (t1) overlaps DB1.DBB0 (t0, 12 bytes)"),
        (2, "DB1.DBX10.0 (t2) overlaps DB1.DBB0 (t0, 12 bytes)"),
        (5, "DB1.DBX20.1 (t5) overlaps DB1.DBX20.1 (t4, 1 byte)"),
        (8, "M20.3 (t8) overlaps MB20 (t7, 1 byte)"),
    ]


def test_default_and_pg_tsaps() -> None:
    # basic communication (0x03) unless asked: PG (0x01) can push TIA Portal off the CPU
    assert device(("M0.0", None)).tsaps == (0x0100, 0x0301)
    assert device(("M0.0", None), slot=2, connection_type="PG").tsaps == (0x0100, 0x0102)


def test_remote_tsap_excludes_rack_and_slot() -> None:
    assert device(("M0.0", None), remote_tsap="03.01").tsaps == (0x0100, 0x0301)
    assert device(("M0.0", None), rack=1, slot=2, connection_type="OP").tsaps == (0x0100, 0x0222)
    with pytest.raises(ValidationError, match="remote_tsap already holds"):
        device(("M0.0", None), remote_tsap="03.01", slot=2)


@st.composite
def pdu_and_sizes(draw: st.DrawFn) -> tuple[int, list[int], int]:
    pdu = draw(st.sampled_from([240, 480, 960]))
    sizes = draw(st.lists(st.integers(1, payload_limit(pdu)), max_size=120))
    return pdu, sizes, draw(st.integers(1, 20))


@given(pdu_and_sizes())
def test_packed_requests_fit_the_pdu(case: tuple[int, list[int], int]) -> None:
    pdu, sizes, max_items = case
    bins = pack_items(sizes, pdu=pdu, max_items=max_items)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    k = items_limit(pdu, max_items)
    for b in bins:
        assert b == sorted(b) and 1 <= len(b) <= k
        assert 12 + 2 + sum(item_cost(sizes[i]) for i in b) <= pdu  # the answer fits
        assert 10 + 2 + 12 * len(b) <= pdu  # and so does the request
    if sizes:
        costs = [item_cost(s) for s in sizes]
        big = sum(c > (pdu - 14) / 2 for c in costs)  # no two of these share an answer
        lower = max(math.ceil(sum(costs) / (pdu - 14)), math.ceil(len(sizes) / k), big)
        assert lower <= len(bins) <= 2 * lower  # first fit decreasing stays near the bound


def test_plan_merges_splits_and_packs() -> None:
    tags = [
        tag("DB1.DBD0", "real"),
        tag("DB1.DBD8", "real"),  # 4-byte gap: merged
        tag("DB1.DBD100", "real"),  # 88-byte gap: a new range
        tag("DB2.DBB0", "string"),  # 256 bytes on a 240-byte PDU: two parts
        tag("M0.1", None),
    ]
    plan = plan_group(tags, pdu=240, planner=S7Planner())
    items = [it for r in plan.requests for it in r.items]
    assert sorted((it.area, it.db, it.start, it.size) for it in items) == [
        (Area.DB, 1, 0, 12),
        (Area.DB, 1, 100, 4),
        (Area.DB, 2, 0, 222),
        (Area.DB, 2, 222, 34),
        (Area.MARKER, 0, 0, 1),
    ]
    assert plan.nbytes == 12 + 4 + 256 + 1
    assert len(plan.requests) == 2  # 222 data bytes fill one answer; the rest share another
    assert plan.kinds == ("float", "float", "float", "str", "bool")
    # each item named as the tags write its area: a string past one PDU is read in two parts
    assert sorted(it.label for it in items) == [
        "DB1.DBB0–DBB11",
        "DB1.DBB100–DBB103",
        "DB2.DBB0–DBB221",
        "DB2.DBB222–DBB255",
        "MB0",
    ]


def test_requests_are_named_in_the_tags_notation() -> None:
    """check --plan and the warnings name byte ranges as the tags write their areas (E/A when written German)."""
    from edge_agent.drivers.s7.driver import S7Driver  # python-snap7; the driver does no I/O until connect

    def requests(*addresses: tuple[str, str | None], pdu: int = 480) -> list[tuple[str, tuple[str, ...]]]:
        tags = [{"name": f"t{i}", "address": a, **({"type": t} if t else {})} for i, (a, t) in enumerate(addresses)]
        dev = S7Device.model_validate({"type": "s7", "name": "plc", "host": "h", "pdu_size": pdu, "tags": tags})
        driver = S7Driver(dev)
        return [(r.label, r.tags) for r in driver.requests()[driver.groups[0]]]

    reals = [(f"DB10.DBD{4 * i}", "real") for i in range(120)]
    assert requests(*reals, pdu=960) == [("DB10.DBB0–DBB479", tuple(f"t{i}" for i in range(120)))]
    assert requests(("MB0", "byte"), ("MW6", "int"), ("I0.1", None), ("IB3", "byte"), ("Q0.0", None)) == [
        ("IB0–IB3, MB0–MB7, QB0", ("t0", "t1", "t2", "t3", "t4"))
    ]
    assert requests(("E0.1", None), ("EB3", "byte"), ("A0.0", None)) == [("EB0–EB3, AB0", ("t0", "t1", "t2"))]
    assert requests(("E0.1", None), ("IB3", "byte")) == [("IB0–IB3", ("t0", "t1"))]  # mixed: the English letter
    assert requests(("DB1.DBX4.0", None)) == [("DB1.DBB4", ("t0",))]


@given(st.binary(min_size=8, max_size=8), st.integers(0, 7))
def test_byte_decoder_matches_struct(raw: bytes, bit: int) -> None:
    block = np.frombuffer(raw, dtype=np.uint8)
    values = np.full(4, np.nan)
    ByteDecoder(
        [
            ByteField(0, 3),
            ByteField(1, 5, signed=True, scale=0.5, offset=1.0),
            ByteField(2, 7, bit=bit),
            ByteField(3, 0, bit=7 - bit),
        ]
    ).decode(block, values)
    assert values[0] == raw[3]
    assert values[1] == struct.unpack(">b", raw[5:6])[0] * 0.5 + 1.0
    assert values[2] == (raw[7] >> bit) & 1
    assert values[3] == (raw[0] >> (7 - bit)) & 1
