"""Data types, byte orders and vectorised decoding of register/byte blocks.

A block is the raw bytes of one read response in wire order. Every tag in the block is a field at a
byte offset; fields of the same type and byte order are decoded together with one numpy gather.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from edge_agent.types import FloatArray, Quality, QualityArray, Value

U8Array = npt.NDArray[np.uint8]
_EXACT_LIMIT = float(2**53)  # float64 holds every integer up to here


class DataType(StrEnum):
    """Value types a tag can have."""

    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


class ByteOrder(StrEnum):
    """Order of a value's bytes on the wire; A is the most significant byte.

    ABCD is big-endian (the Modbus standard), DCBA little-endian, BADC swaps the bytes in each
    16-bit register, CDAB swaps the registers (word order) and keeps the bytes in each.
    """

    ABCD = "ABCD"
    BADC = "BADC"
    CDAB = "CDAB"
    DCBA = "DCBA"

    @property
    def swaps_words(self) -> bool:
        """Registers come least significant first."""
        return self in (ByteOrder.CDAB, ByteOrder.DCBA)

    @property
    def swaps_bytes(self) -> bool:
        """Bytes inside each register come least significant first."""
        return self in (ByteOrder.BADC, ByteOrder.DCBA)


# numpy big-endian dtype and width in bytes per numeric type
NUMERIC: dict[DataType, tuple[str, int]] = {
    DataType.INT16: (">i2", 2),
    DataType.UINT16: (">u2", 2),
    DataType.INT32: (">i4", 4),
    DataType.UINT32: (">u4", 4),
    DataType.INT64: (">i8", 8),
    DataType.UINT64: (">u8", 8),
    DataType.FLOAT32: (">f4", 4),
    DataType.FLOAT64: (">f8", 8),
}
_STRUCT = {
    DataType.INT16: ">h",
    DataType.UINT16: ">H",
    DataType.INT32: ">i",
    DataType.UINT32: ">I",
    DataType.INT64: ">q",
    DataType.UINT64: ">Q",
    DataType.FLOAT32: ">f",
    DataType.FLOAT64: ">d",
}


def kind_of(dtype: DataType) -> str:
    """The Python kind a value of this type renders as: float, int, bool or str."""
    if dtype is DataType.BOOL:
        return "bool"
    if dtype is DataType.STRING:
        return "str"
    return "float" if dtype in (DataType.FLOAT32, DataType.FLOAT64) else "int"


def shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: 3.14159, not its float64 widening 3.141590118408203."""
    return float(str(np.float32(value)))


def width_of(dtype: DataType, length: int = 0) -> int:
    """Bytes a value occupies (strings: `length` characters, rounded up to whole registers)."""
    if dtype is DataType.STRING:
        return length + (length % 2)
    if dtype is DataType.BOOL:
        return 2
    return NUMERIC[dtype][1]


def byte_permutation(width: int, order: ByteOrder) -> tuple[int, ...]:
    """For each big-endian byte of the value, its position in the wire bytes."""
    regs = width // 2
    perm = []
    for j in range(width):
        reg, byte = divmod(j, 2)
        src_reg = regs - 1 - reg if order.swaps_words else reg
        src_byte = 1 - byte if order.swaps_bytes else byte
        perm.append(2 * src_reg + src_byte)
    return tuple(perm)


def encode(value: float | int | str, dtype: DataType, order: ByteOrder, length: int = 0) -> bytes:
    """Encode one value into wire bytes (the inverse of decoding; used by tests and simulators)."""
    if dtype is DataType.STRING:
        raw = str(value).encode("latin-1")[:length].ljust(width_of(dtype, length), b"\0")
        if order.swaps_bytes:
            raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        return raw
    if dtype is DataType.BOOL:
        return b"\x00\x01" if value else b"\x00\x00"
    big = struct.pack(_STRUCT[dtype], value)
    perm = byte_permutation(len(big), order)
    wire = bytearray(len(big))
    for j, src in enumerate(perm):
        wire[src] = big[j]
    return bytes(wire)


def registers_of(wire: bytes) -> list[int]:
    """Split wire bytes into 16-bit register values."""
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


@dataclass(frozen=True, slots=True)
class Field:
    """Where one tag sits in a block and how to turn its bytes into a value."""

    col: int  # column of the tag in the batch
    byte_offset: int
    dtype: DataType
    order: ByteOrder = ByteOrder.ABCD
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None  # bool taken from one bit of a 16-bit register
    length: int = 0  # string length in characters


@dataclass
class _NumericGroup:
    dtype: str
    cols: npt.NDArray[np.intp]
    gather: npt.NDArray[np.intp]  # n_fields × width byte positions, big-endian order
    scale: FloatArray
    offset: FloatArray
    exact_ints: bool  # 64-bit integers: keep values float64 cannot hold exactly


class BlockDecoder:
    """Decodes every field of a block in a few vectorised steps (one per type and byte order)."""

    def __init__(self, fields: Sequence[Field]) -> None:
        self._groups: list[_NumericGroup] = []
        self._bits: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]] = []
        self._strings: list[tuple[int, npt.NDArray[np.intp]]] = []
        self.span = max((f.byte_offset + width_of(f.dtype, f.length) for f in fields), default=0)
        by_key: dict[tuple[DataType, ByteOrder], list[Field]] = defaultdict(list)
        bit_fields: dict[ByteOrder, list[Field]] = defaultdict(list)
        for f in fields:
            if f.dtype is DataType.STRING:
                perm = byte_permutation(2, ByteOrder.BADC if f.order.swaps_bytes else ByteOrder.ABCD)
                idx = [f.byte_offset + 2 * (i // 2) + perm[i % 2] for i in range(width_of(f.dtype, f.length))]
                self._strings.append((f.col, np.asarray(idx[: f.length], dtype=np.intp)))
            elif f.dtype is DataType.BOOL:
                bit_fields[f.order].append(f)
            else:
                by_key[(f.dtype, f.order)].append(f)
        for (dtype, order), group in by_key.items():
            np_dtype, width = NUMERIC[dtype]
            gather_perm = np.asarray(byte_permutation(width, order), dtype=np.intp)
            offsets = np.asarray([f.byte_offset for f in group], dtype=np.intp)
            self._groups.append(
                _NumericGroup(
                    dtype=np_dtype,
                    cols=np.asarray([f.col for f in group], dtype=np.intp),
                    gather=offsets[:, None] + gather_perm[None, :],
                    scale=np.asarray([f.scale for f in group], dtype=np.float64),
                    offset=np.asarray([f.offset for f in group], dtype=np.float64),
                    exact_ints=dtype in (DataType.INT64, DataType.UINT64)
                    and all(f.scale == 1.0 and f.offset == 0.0 for f in group),
                )
            )
        float_groups = [g.cols for g in self._groups if g.dtype[1] == "f"]
        self._float_cols = np.concatenate(float_groups) if float_groups else np.empty(0, dtype=np.intp)
        for order, group in bit_fields.items():
            word_perm = np.asarray(byte_permutation(2, order), dtype=np.intp)
            offsets = np.asarray([f.byte_offset for f in group], dtype=np.intp)
            # bit None means "the register is non-zero": test all 16 bits
            masks = np.asarray([0xFFFF if f.bit is None else 1 << f.bit for f in group], dtype=np.intp)
            self._bits.append(
                (np.asarray([f.col for f in group], dtype=np.intp), offsets[:, None] + word_perm[None, :], masks)
            )

    def decode(self, block: U8Array, values: FloatArray, quality: QualityArray, exact: dict[int, Value]) -> None:
        """Write each field's value into `values[col]`; non-finite numbers are marked bad."""
        for g in self._groups:
            raw = np.ascontiguousarray(block[g.gather]).view(g.dtype).reshape(-1)
            out = raw.astype(np.float64)
            np.multiply(out, g.scale, out=out)
            np.add(out, g.offset, out=out)
            values[g.cols] = out
            if g.exact_ints:
                big = np.flatnonzero(np.abs(out) > _EXACT_LIMIT)
                for k in big:
                    exact[int(g.cols[k])] = int(raw[k])
        for cols, gather, masks in self._bits:
            words = np.ascontiguousarray(block[gather]).view(">u2").reshape(-1).astype(np.intp)
            values[cols] = (words & masks) != 0
        for col, idx in self._strings:
            text = block[idx].tobytes().split(b"\0", 1)[0].decode("latin-1").rstrip()
            exact[col] = text
            values[col] = np.nan
        if self._float_cols.size:
            # a PLC float that is NaN or infinite is not a usable measurement
            bad = ~np.isfinite(values[self._float_cols])
            if bad.any():
                quality[self._float_cols[bad]] = Quality.BAD


def bits_to_values(bits: Sequence[bool], offsets: npt.NDArray[np.intp]) -> FloatArray:
    """Pick single-bit values (coils, discrete inputs) out of a bit block."""
    return np.asarray(bits, dtype=np.float64)[offsets]


@dataclass(frozen=True, slots=True)
class ByteField:
    """A tag held in one byte of a byte-addressed block (S7): an 8-bit integer, or one bit of the byte."""

    col: int
    byte_offset: int
    signed: bool = False
    bit: int | None = None  # 0 = least significant bit of the byte; None = the whole byte as a number
    scale: float = 1.0
    offset: float = 0.0


class ByteDecoder:
    """Decodes 8-bit integers and byte bits in two vectorised steps (BlockDecoder works in 16-bit words)."""

    def __init__(self, fields: Sequence[ByteField]) -> None:
        ints = [f for f in fields if f.bit is None]
        bits = [f for f in fields if f.bit is not None]
        self._int_cols = np.asarray([f.col for f in ints], dtype=np.intp)
        self._int_offsets = np.asarray([f.byte_offset for f in ints], dtype=np.intp)
        self._signed = np.asarray([f.signed for f in ints], dtype=bool)
        self._scale = np.asarray([f.scale for f in ints], dtype=np.float64)
        self._offset = np.asarray([f.offset for f in ints], dtype=np.float64)
        self._bit_cols = np.asarray([f.col for f in bits], dtype=np.intp)
        self._bit_offsets = np.asarray([f.byte_offset for f in bits], dtype=np.intp)
        self._bit_numbers = np.asarray([f.bit for f in bits], dtype=np.uint8)
        self.span = max((f.byte_offset + 1 for f in fields), default=0)

    def decode(self, block: U8Array, values: FloatArray) -> None:
        """Write each field's value into `values[col]`."""
        if self._int_cols.size:
            raw = block[self._int_offsets]
            out = np.where(self._signed, raw.view(np.int8), raw).astype(np.float64)
            np.multiply(out, self._scale, out=out)
            np.add(out, self._offset, out=out)
            values[self._int_cols] = out
        if self._bit_cols.size:
            values[self._bit_cols] = (block[self._bit_offsets] >> self._bit_numbers) & 1
