"""Property tests for the codecs and the Modbus address parser."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.drivers.codecs import (
    NUMERIC,
    BlockDecoder,
    ByteOrder,
    DataType,
    Field,
    byte_permutation,
    encode,
    shortest_float32,
)
from edge_agent.drivers.modbus.config import Table, parse_address
from edge_agent.types import Quality

INT_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}


def decode_one(wire: bytes, field: Field) -> tuple[object, Quality]:
    values = np.full(1, np.nan)
    quality = np.zeros(1, dtype=np.uint8)
    exact: dict[int, object] = {}
    BlockDecoder([field]).decode(np.frombuffer(wire, dtype=np.uint8), values, quality, exact)  # type: ignore[arg-type]
    return exact.get(0, values[0]), Quality(int(quality[0]))


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[DataType, float | int]:
    dtype = draw(st.sampled_from(list(NUMERIC)))
    if dtype in INT_RANGES:
        lo, hi = INT_RANGES[dtype]
        return dtype, draw(st.integers(lo, hi))
    width = 32 if dtype is DataType.FLOAT32 else 64
    return dtype, draw(st.floats(allow_nan=False, allow_infinity=False, width=width))


@given(typed_values(), st.sampled_from(list(ByteOrder)), st.integers(0, 8))
def test_numeric_round_trip(tv: tuple[DataType, float | int], order: ByteOrder, pad_regs: int) -> None:
    dtype, value = tv
    wire = b"\x55\xaa" * pad_regs + encode(value, dtype, order)
    got, quality = decode_one(wire, Field(0, 2 * pad_regs, dtype, order))
    assert quality is Quality.GOOD
    if isinstance(value, int) and abs(value) > 2**53:
        assert got == value  # carried exactly, not through float64
    else:
        assert got == pytest.approx(value, rel=1e-12, abs=0)


@given(st.sampled_from(list(ByteOrder)), st.sampled_from([2, 4, 8]))
def test_permutation_is_a_permutation(order: ByteOrder, width: int) -> None:
    assert sorted(byte_permutation(width, order)) == list(range(width))


def test_orders_match_the_names() -> None:
    big = struct.pack(">I", 0x0A0B0C0D)
    assert encode(0x0A0B0C0D, DataType.UINT32, ByteOrder.ABCD) == big
    assert encode(0x0A0B0C0D, DataType.UINT32, ByteOrder.DCBA) == big[::-1]
    assert encode(0x0A0B0C0D, DataType.UINT32, ByteOrder.BADC) == bytes([0x0B, 0x0A, 0x0D, 0x0C])
    assert encode(0x0A0B0C0D, DataType.UINT32, ByteOrder.CDAB) == bytes([0x0C, 0x0D, 0x0A, 0x0B])


@given(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20), st.sampled_from(list(ByteOrder))
)
def test_string_round_trip(text: str, order: ByteOrder) -> None:
    length = 20
    got, _ = decode_one(
        encode(text, DataType.STRING, order, length), Field(0, 0, DataType.STRING, order, length=length)
    )
    assert got == text.rstrip()


@given(st.integers(0, 0xFFFF), st.integers(0, 15), st.sampled_from(list(ByteOrder)))
def test_register_bits(word: int, bit: int, order: ByteOrder) -> None:
    wire = encode(word, DataType.UINT16, order)
    got, _ = decode_one(wire, Field(0, 0, DataType.BOOL, order, bit=bit))
    assert bool(got) == bool(word >> bit & 1)


def test_scale_offset_and_nan() -> None:
    got, q = decode_one(encode(-250, DataType.INT16, ByteOrder.ABCD), Field(0, 0, DataType.INT16, scale=0.1, offset=2))
    assert got == pytest.approx(-23.0) and q is Quality.GOOD
    _, q = decode_one(encode(math.nan, DataType.FLOAT32, ByteOrder.ABCD), Field(0, 0, DataType.FLOAT32))
    assert q is Quality.BAD


def test_many_fields_one_block_decode_matches_individual() -> None:
    rng = np.random.default_rng(1)
    fields, wire = [], b""
    expected = []
    for col in range(300):
        dtype = [DataType.FLOAT32, DataType.INT16, DataType.UINT32, DataType.FLOAT64][col % 4]
        order = list(ByteOrder)[col % 3]
        value = (
            float(rng.normal() * 100) if dtype in (DataType.FLOAT32, DataType.FLOAT64) else int(rng.integers(0, 30000))
        )
        fields.append(Field(col, len(wire), dtype, order))
        wire += encode(value, dtype, order)
        expected.append(np.float32(value) if dtype is DataType.FLOAT32 else value)
    values = np.full(300, np.nan)
    BlockDecoder(fields).decode(np.frombuffer(wire, np.uint8), values, np.zeros(300, np.uint8), {})  # type: ignore[arg-type]
    np.testing.assert_allclose(values, np.asarray(expected, dtype=np.float64), rtol=1e-7)


# ---------------------------------------------------------------- addresses


@given(st.sampled_from(["0", "1", "3", "4"]), st.integers(1, 9999))
def test_modicon_five_digit(digit: str, number: int) -> None:
    a = parse_address(f"{digit}{number:04d}")
    assert a.index == number - 1
    assert a.table is {"0": Table.COIL, "1": Table.DISCRETE, "3": Table.INPUT, "4": Table.HOLDING}[digit]


@given(st.sampled_from(["0", "1", "3", "4"]), st.integers(1, 65536))
def test_modicon_six_digit(digit: str, number: int) -> None:
    assert parse_address(f"{digit}{number:05d}").index == number - 1


@given(st.sampled_from(["holding", "hr", "input", "ir", "coil", "di", "discrete"]), st.integers(0, 65535))
def test_explicit(table: str, index: int) -> None:
    a = parse_address(f"{table}:{index}")
    assert a.index == index
    assert parse_address(f"{table}:{hex(index)}").index == index


@given(st.text(max_size=12))
def test_parser_never_crashes(text: str) -> None:
    try:
        a = parse_address(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0 <= a.index <= 65535 and (a.bit is None or 0 <= a.bit <= 15)


@given(st.integers(0, 15))
def test_register_bit_suffix(bit: int) -> None:
    assert parse_address(f"40001.{bit}").bit == bit
    with pytest.raises(ValueError, match="bit"):
        parse_address(f"10001.{bit}")


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_shortest_float32_reads_back_as_the_same_float32(x: float) -> None:
    v = shortest_float32(x)
    assert np.float32(v) == np.float32(x)
    assert float(f"{v:.9g}") == v  # no float64 noise: 9 significant digits always identify a float32


def test_shortest_float32_is_what_was_written() -> None:
    widened = float(np.float32(3.14159))
    assert widened == 3.141590118408203
    assert shortest_float32(widened) == 3.14159 and repr(shortest_float32(widened)) == "3.14159"
