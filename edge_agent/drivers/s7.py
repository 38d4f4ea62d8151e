"""Siemens S7 driver (python-snap7): config model, Siemens addresses, PDU-aware read planning, runtime client.

python-snap7's client is blocking, so every call runs on one worker thread per connection; the event
loop only awaits it. Reads are planned once: nearby tags of one area or DB merge into byte ranges, and
ranges are packed into multi-variable read requests that fit the negotiated PDU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import snap7
from pydantic import Field, PlainSerializer, PlainValidator, model_validator
from snap7.connection import ISOTCPConnection
from snap7.error import S7Error, S7ProtocolError, S7TimeoutError
from snap7.s7protocol import get_return_code_description
from snap7.type import Parameter

from edge_agent.drivers.base import (
    DeviceBase,
    DriverBase,
    DriverPlugin,
    PartFailures,
    ScanGroup,
    TagBase,
    mark_bad,
    overlaps,
)
from edge_agent.drivers.codecs import BlockDecoder, ByteDecoder, ByteField, ByteOrder, DataType, shortest_float32
from edge_agent.drivers.codecs import Field as CodecField
from edge_agent.drivers.planner import Span, plan_reads
from edge_agent.errors import DeviceError, FieldError
from edge_agent.fields import StrictModel
from edge_agent.types import FloatArray, QualityArray, SampleBatch, Value

log = logging.getLogger(__name__)

MAX_ITEMS = 20  # variables per multi-read request (S7 protocol; python-snap7 raises beyond)
READ_OVERHEAD = 18  # response bytes around one item's data: S7 header 12, parameters 2, item header 4
LAST_BYTE = 65535  # byte offsets of standard (non-optimised) DBs and of the M/I/Q areas fit 16 bits
DEFAULT_PDU = 480
MIN_PDU, MAX_PDU = 240, 960

T = TypeVar("T")


# ---------------------------------------------------------------- addresses


class Area(StrEnum):
    """S7 memory areas; the value is the English mnemonic."""

    DB = "DB"
    MARKER = "M"  # bit memory (Merker)
    INPUT = "I"  # process image of inputs (German: E)
    OUTPUT = "Q"  # process image of outputs (German: A)

    @property
    def wire(self) -> int:
        """The area code on the wire."""
        return _WIRE_AREA[self]


_WIRE_AREA = {Area.INPUT: 0x81, Area.OUTPUT: 0x82, Area.MARKER: 0x83, Area.DB: 0x84}
_AREA_LETTER = {"M": Area.MARKER, "I": Area.INPUT, "E": Area.INPUT, "Q": Area.OUTPUT, "A": Area.OUTPUT}


class Width(StrEnum):
    """The size letter of an address: X bit, B byte, W word (2 bytes), D double word (4 bytes)."""

    BIT = "X"
    BYTE = "B"
    WORD = "W"
    DWORD = "D"

    @property
    def nbytes(self) -> int:
        """Bytes the letter spans (a bit lives in one byte)."""
        return {Width.BIT: 1, Width.BYTE: 1, Width.WORD: 2, Width.DWORD: 4}[self]


@dataclass(frozen=True, slots=True)
class S7Address:
    """A parsed address: area, DB number (0 outside DBs), byte offset, size letter, bit (X only)."""

    area: Area
    db: int
    byte: int
    width: Width
    bit: int | None = None
    text: str = field(default="", compare=False)

    @property
    def canonical(self) -> str:
        """The address in English mnemonics: DB10.DBX4.3, DB10.DBW4, MW20, I0.1, QD8."""
        bit = f".{self.bit}" if self.bit is not None else ""
        if self.area is Area.DB:
            return f"DB{self.db}.DB{self.width}{self.byte}{bit}"
        letter = "" if self.width is Width.BIT else self.width.value
        return f"{self.area}{letter}{self.byte}{bit}"

    def with_width(self, width: Width) -> S7Address:
        """The same start byte with another size letter (bit 0 for X), for error hints."""
        return S7Address(self.area, self.db, self.byte, width, 0 if width is Width.BIT else None)

    def __str__(self) -> str:
        return self.text or self.canonical


_ADDRESS_HELP = (
    "write a Siemens address: DB10.DBX4.3 (bit), DB10.DBB4 (byte), DB10.DBW4 (word), DB10.DBD4 (double word); "
    "M3.7, MB5, MW20, MD8; inputs I0.1, IB0, IW2, ID4 (or E0.1, EW2); outputs Q0.0, QB0, QW2, QD8 (or A0.0, AD8)"
)
_DB_RE = re.compile(r"^%?DB(\d{1,9})\.DB([A-Z]?)(\d{1,9})(?:\.(\d{1,9}))?$", re.IGNORECASE | re.ASCII)
_AREA_RE = re.compile(r"^%?([MIEQA])([XBWD]?)(\d{1,9})(?:\.(\d{1,9}))?$", re.IGNORECASE | re.ASCII)


def parse_address(value: Any) -> S7Address:
    """Parse `DB10.DBX4.3`, `DB10.DBW4`, `MW20`, `I0.1`, `E0.1`, `QD8`, `A0.0`, … into an S7Address."""
    if isinstance(value, S7Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address: {_ADDRESS_HELP}")
    text = value.strip()
    m = _DB_RE.match(text)
    if m:
        db_text, letter, byte_text, bit_text = m.groups()
        db = int(db_text)
        if not 1 <= db <= 65535:
            raise ValueError(f"{text!r}: data blocks are numbered 1 to 65535")
        if letter.upper() not in ("X", "B", "W", "D"):
            raise ValueError(f"{text!r}: after DB{db}. write DBX (bit), DBB (byte), DBW (word) or DBD (double word)")
        area, prefix = Area.DB, f"DB{db}.DB"
    else:
        m = _AREA_RE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not an address: {_ADDRESS_HELP}")
        area_text, letter, byte_text, bit_text = m.groups()
        area, db, prefix = _AREA_LETTER[area_text.upper()], 0, area_text.upper()
        if not letter and bit_text is None:
            raise ValueError(
                f"{text!r} names no size: write {prefix}{byte_text}.0 (bit), {prefix}B{byte_text} (byte), "
                f"{prefix}W{byte_text} (word) or {prefix}D{byte_text} (double word)"
            )
        letter = letter or "X"
    width = Width(letter.upper())
    byte = int(byte_text)
    if byte > LAST_BYTE:
        raise ValueError(f"{text!r}: byte offsets run from 0 to {LAST_BYTE}")
    bit: int | None = None
    if width is Width.BIT:
        if bit_text is None:
            raise ValueError(f"{text!r} names a bit: add the bit number, e.g. {prefix}X{byte}.0")
        bit = int(bit_text)
        if bit > 7:
            raise ValueError(f"{text!r}: a byte has bits 0 to 7")
    elif bit_text is not None:
        bits = f"{prefix}X{byte}.{bit_text}" if area is Area.DB else f"{prefix}{byte}.{bit_text}"
        raise ValueError(f"{text!r}: only bit addresses take a bit number (write {bits})")
    return S7Address(area, db, byte, width, bit, text)


Address = Annotated[S7Address, PlainValidator(parse_address), PlainSerializer(str)]


# ---------------------------------------------------------------- types


class S7Type(StrEnum):
    """S7 elementary types (names as TIA Portal writes them, lower case in the file; any case is read)."""

    BOOL = "bool"
    BYTE = "byte"
    CHAR = "char"
    SINT = "sint"
    USINT = "usint"
    INT = "int"
    UINT = "uint"
    WORD = "word"
    DINT = "dint"
    UDINT = "udint"
    DWORD = "dword"
    REAL = "real"
    LINT = "lint"
    ULINT = "ulint"
    LWORD = "lword"
    LREAL = "lreal"
    STRING = "string"


_NBYTES = {
    S7Type.BOOL: 1,
    S7Type.BYTE: 1,
    S7Type.CHAR: 1,
    S7Type.SINT: 1,
    S7Type.USINT: 1,
    S7Type.INT: 2,
    S7Type.UINT: 2,
    S7Type.WORD: 2,
    S7Type.DINT: 4,
    S7Type.UDINT: 4,
    S7Type.DWORD: 4,
    S7Type.REAL: 4,
    S7Type.LINT: 8,
    S7Type.ULINT: 8,
    S7Type.LWORD: 8,
    S7Type.LREAL: 8,
}
# types decoded as big-endian words by the shared BlockDecoder
_CODEC = {
    S7Type.INT: DataType.INT16,
    S7Type.UINT: DataType.UINT16,
    S7Type.WORD: DataType.UINT16,
    S7Type.DINT: DataType.INT32,
    S7Type.UDINT: DataType.UINT32,
    S7Type.DWORD: DataType.UINT32,
    S7Type.REAL: DataType.FLOAT32,
    S7Type.LINT: DataType.INT64,
    S7Type.ULINT: DataType.UINT64,
    S7Type.LWORD: DataType.UINT64,
    S7Type.LREAL: DataType.FLOAT64,
}
# the size letter each type is written with; 8-byte values and strings have none: their first byte (B)
_WIDTH_OF = {1: Width.BYTE, 2: Width.WORD, 4: Width.DWORD, 8: Width.BYTE}
_TYPE_HINTS = {
    "float": "real",
    "float32": "real",
    "float64": "lreal",
    "double": "lreal",
    "int8": "sint",
    "uint8": "usint",
    "int16": "int",
    "uint16": "uint or word",
    "int32": "dint",
    "uint32": "udint or dword",
    "int64": "lint",
    "uint64": "ulint or lword",
    "bit": "bool",
    "boolean": "bool",
}
_STRING_RE = re.compile(r"^string\s*\[\s*(\d{1,9})\s*\]$", re.ASCII)
MAX_STRING = 254


@dataclass(frozen=True, slots=True)
class S7DataType:
    """A tag's type: an S7Type, and for strings the declared maximum length in characters."""

    type: S7Type
    length: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the value occupies; an S7 STRING[n] has a 2-byte header (max length, actual length)."""
        return self.length + 2 if self.type is S7Type.STRING else _NBYTES[self.type]

    @property
    def kind(self) -> str:
        """How values render: bool, int, float or str."""
        if self.type is S7Type.BOOL:
            return "bool"
        if self.type in (S7Type.CHAR, S7Type.STRING):
            return "str"
        return "float" if self.type in (S7Type.REAL, S7Type.LREAL) else "int"

    def __str__(self) -> str:
        return f"string[{self.length}]" if self.type is S7Type.STRING else self.type.value


_TYPE_NAMES = ", ".join(t.value for t in S7Type if t is not S7Type.STRING) + " or string[N]"


def parse_type(value: Any) -> S7DataType:
    """Parse `real`, `REAL`, `string[16]`, `String` (= string[254], as in TIA Portal), … into an S7DataType."""
    if isinstance(value, S7DataType):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an S7 type: write {_TYPE_NAMES}")
    text = value.strip().lower()
    m = _STRING_RE.match(text)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= MAX_STRING:
            raise ValueError(f"{value!r}: an S7 string holds 1 to {MAX_STRING} characters")
        return S7DataType(S7Type.STRING, n)
    if text == "string":
        return S7DataType(S7Type.STRING, MAX_STRING)  # STRING without a length is STRING[254] in S7
    try:
        return S7DataType(S7Type(text))
    except ValueError:
        pass
    hint = f" ({_TYPE_HINTS[text]} is the S7 name)" if text in _TYPE_HINTS else ""
    raise ValueError(f"{value!r} is not an S7 type{hint}: write {_TYPE_NAMES}")


TypeSpec = Annotated[S7DataType, PlainValidator(parse_type), PlainSerializer(str)]


def parse_tsap(value: Any) -> int:
    """Parse a TSAP: `0x0301`, `03.01` (hex bytes, as STEP 7 shows them) or a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[0-9a-fA-F]{1,2}[.:][0-9a-fA-F]{1,2}\s*", value):
        hi, lo = re.split(r"[.:]", value.strip())
        n = int(hi, 16) << 8 | int(lo, 16)
    elif isinstance(value, str) and re.fullmatch(r"\s*0x[0-9a-fA-F]{1,4}\s*", value):
        n = int(value, 16)
    else:
        raise ValueError(f"{value!r} is not a TSAP: write 0x0301, 03.01 (hex bytes) or a number 0..65535")
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"{value!r}: a TSAP is two bytes (0 to 65535)")
    return n


Tsap = Annotated[int, PlainValidator(parse_tsap), PlainSerializer(lambda v: f"0x{v:04X}")]


# ---------------------------------------------------------------- config


class S7Tag(TagBase):
    """One value on an S7 PLC."""

    address: Address
    type: TypeSpec | None = Field(None, description=f"{_TYPE_NAMES}; default bool for bit addresses")
    scale: float = Field(1.0, description="value = raw × scale + offset")
    offset: float = 0.0

    def where(self) -> str:
        """The address as written (DB10.DBD4, MW100, I0.1)."""
        return str(self.address)

    def json_value(self, value: Any) -> Any:
        """REAL values printed as written (3.14159, not 3.141590118408203)."""
        if isinstance(value, float) and self.dtype.type is S7Type.REAL:
            return shortest_float32(value)
        return value

    @property
    def dtype(self) -> S7DataType:
        """The tag's type (bool when a bit address leaves it out)."""
        return self.type if self.type is not None else S7DataType(S7Type.BOOL)

    @property
    def size(self) -> int:
        """Bytes read for the tag."""
        return self.dtype.nbytes

    @model_validator(mode="after")
    def _fits_address(self) -> S7Tag:
        a = self.address
        if self.type is None:
            if a.width is not Width.BIT:
                choices = {
                    Width.BYTE: "byte, usint, sint, char (or lreal, lint, ulint, lword, string[N] starting here)",
                    Width.WORD: "int, uint or word",
                    Width.DWORD: "real, dint, udint or dword",
                }[a.width]
                raise FieldError("type", f"required for {a}: {choices}")
            return self
        t = self.type
        if a.width is Width.BIT and t.type is not S7Type.BOOL:
            raise FieldError("type", f"{a} names one bit: type must be bool, not {t}")
        if t.type is S7Type.BOOL and a.width is not Width.BIT:
            raise FieldError("type", f"bool needs a bit address such as {a.with_width(Width.BIT).canonical}")
        n = t.nbytes
        want = Width.BYTE if t.type is S7Type.STRING else _WIDTH_OF.get(n, Width.BYTE)
        if a.width is not want and t.type is not S7Type.BOOL:
            hint = a.with_width(want).canonical
            if t.type is S7Type.STRING or n == 8:
                why = f"{t} takes {n} bytes: address it by its first byte, {hint} (S7 has no size letter for it)"
            else:
                why = f"{t} is {n} byte{'s' if n > 1 else ''} but {a} is {a.width.nbytes}: write {hint}"
            raise FieldError("type", why)
        if t.type in (S7Type.BOOL, S7Type.CHAR, S7Type.STRING) and (self.scale != 1.0 or self.offset != 0.0):
            raise FieldError(
                "scale" if self.scale != 1.0 else "offset", f"scale and offset apply to numbers, not to {t}"
            )
        if self.scale == 0:
            raise FieldError("scale", "scale 0 would turn every value into the offset")
        if a.byte + n - 1 > LAST_BYTE:
            raise FieldError("address", f"{a} with {n} bytes runs past byte {LAST_BYTE}")
        return self


class ConnectionType(StrEnum):
    """The connection resource the PLC gives us."""

    PG = "PG"  # programming device
    OP = "OP"  # operator panel
    BASIC = "basic"  # S7 basic communication

    @classmethod
    def _missing_(cls, value: object) -> ConnectionType | None:
        text = str(value).lower()
        return next((m for m in cls if m.value.lower() == text), None)

    @property
    def code(self) -> int:
        """The high byte of the remote TSAP."""
        return {ConnectionType.PG: 1, ConnectionType.OP: 2, ConnectionType.BASIC: 3}[self]


class PlannerMode(StrEnum):
    """Whether neighbouring tags are read as one byte range."""

    MERGE = "merge"  # fewest ranges within max_gap; ranges packed into multi-variable requests
    NONE = "none"  # one range per tag (still packed up to max_items per request)


class S7Planner(StrictModel):
    """How tags are coalesced into byte ranges and ranges into requests."""

    mode: PlannerMode = PlannerMode.MERGE
    max_gap: int = Field(32, ge=0, le=MAX_PDU, description="unused bytes a merged range may span between tags")
    max_items: int = Field(
        MAX_ITEMS,
        ge=1,
        le=MAX_ITEMS,
        description="ranges per read request: 20 is the S7 limit; some S7-compatible devices take fewer",
    )


class S7Device(DeviceBase):
    """A Siemens S7-300/400/1200/1500 (or compatible) PLC over ISO-on-TCP."""

    type: Literal["s7"]
    host: str = Field(description="IP address or hostname of the CPU or CP")
    port: int = Field(102, ge=1, le=65535, description="ISO-on-TCP port")
    rack: int = Field(0, ge=0, le=7)
    slot: int = Field(1, ge=0, le=31, description="CPU slot: 1 (or 0) for S7-1200/1500, 2 for S7-300")
    connection_type: ConnectionType = Field(
        ConnectionType.BASIC,
        description=(
            "basic (default), OP or PG. A PG connection takes the programming-device resource: on a real "
            "PLC it can kick the engineering workstation (TIA Portal, STEP 7) off the CPU; use it only "
            "when the CPU refuses the others"
        ),
    )
    local_tsap: Tsap | None = Field(None, description="our TSAP (default 0x0100); 0x0301 or 03.01")
    remote_tsap: Tsap | None = Field(
        None, description="the PLC's TSAP, instead of rack/slot/connection_type (LOGO!, CPs, S7-200)"
    )
    pdu_size: int = Field(
        DEFAULT_PDU,
        ge=MIN_PDU,
        le=MAX_PDU,
        description="PDU size to ask for; when the PLC grants less, the reads are re-planned for it",
    )
    planner: S7Planner = S7Planner()
    tags: list[S7Tag] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_addressing(self) -> S7Device:
        if self.remote_tsap is not None:
            for name in ("rack", "slot", "connection_type"):
                if name in self.model_fields_set:
                    raise FieldError(
                        name, "remote_tsap already holds connection type, rack and slot: give one or the other"
                    )
        return self

    @property
    def tsaps(self) -> tuple[int, int]:
        """(local, remote) TSAPs; the remote one encodes connection type, rack and slot unless given."""
        local = self.local_tsap if self.local_tsap is not None else 0x0100
        if self.remote_tsap is not None:
            return local, self.remote_tsap
        return local, self.connection_type.code << 8 | self.rack << 5 | self.slot

    def check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Tags whose bytes overlap (two bits of one byte do not)."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        by_block: dict[tuple[Area, int], list[tuple[int, S7Tag]]] = defaultdict(list)
        for i, tag in enumerate(self.tags):
            by_block[(tag.address.area, tag.address.db)].append((i, tag))
        for entries in by_block.values():
            for i, j in overlaps((i, t.address.byte, t.address.bit, t.size) for i, t in entries):
                tag, other = self.tags[i], self.tags[j]
                n = 1 if other.address.bit is not None else other.size
                size = f"{n} byte{'s' if n > 1 else ''}"
                problems.append(
                    (
                        ("tags", i, "address"),
                        f"{tag.address} ({tag.name}) overlaps {other.address} ({other.name}, {size})",
                    )
                )
        return problems


# ---------------------------------------------------------------- planning


def payload_limit(pdu: int) -> int:
    """Data bytes one read item can carry in a PDU of this size."""
    return pdu - READ_OVERHEAD


def items_limit(pdu: int, max_items: int = MAX_ITEMS) -> int:
    """Items one request may hold: the protocol cap, and 12 request bytes per item in the PDU."""
    return max(1, min(max_items, MAX_ITEMS, (pdu - 12) // 12))


def item_cost(size: int) -> int:
    """Response bytes one item takes: 4-byte item header, data, and a fill byte after odd data."""
    return 4 + size + (size & 1)


def pack_items(sizes: Sequence[int], *, pdu: int, max_items: int = MAX_ITEMS) -> list[list[int]]:
    """Group item indices into requests whose answers fit the PDU (first fit, largest first).

    Each request holds at most `items_limit(pdu, max_items)` items, and the sum of their
    `item_cost` fits the response's data section (PDU minus 14 header and parameter bytes).
    Every size must be at most `payload_limit(pdu)`. Indices within a request are ascending.
    """
    cap = pdu - 14
    k = items_limit(pdu, max_items)
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # bins that may still take an item
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        if sizes[i] > payload_limit(pdu):
            raise ValueError(f"item of {sizes[i]} bytes exceeds the {payload_limit(pdu)} a PDU of {pdu} carries")
        cost = item_cost(sizes[i])
        for b in open_bins:
            if room[b] >= cost:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(cap)
            open_bins.append(b)
        bins[b].append(i)
        room[b] -= cost
        if len(bins[b]) >= k or room[b] < item_cost(1):
            open_bins.remove(b)
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PlannedItem:
    """One byte range read as one item of a request, and where its bytes go in the group buffer."""

    area: Area
    db: int
    start: int
    size: int
    buf_offset: int
    cols: npt.NDArray[np.intp]  # tags whose bytes lie (partly) in this item
    label: str


@dataclass(frozen=True)
class PlannedRequest:
    """One read request: up to 20 items whose answer fits the PDU."""

    items: tuple[PlannedItem, ...]
    spec: tuple[tuple[int, int, int, int], ...]  # (area code, db, start, size) per item


@dataclass(frozen=True)
class ReadPlan:
    """A scan group's requests for one PDU size, and the decoders for the bytes they bring back."""

    pdu: int
    requests: tuple[PlannedRequest, ...]
    kinds: tuple[str, ...]
    nbytes: int  # every range of one cycle, back to back
    word_decoder: BlockDecoder  # 16/32/64-bit numbers (big-endian)
    byte_decoder: ByteDecoder  # 8-bit numbers and bits
    texts: tuple[tuple[int, int, int], ...]  # (col, buffer offset, max length; 0 = CHAR)


def _label(area: Area, db: int, start: int, size: int) -> str:
    where = f"DB{db}" if area is Area.DB else str(area)
    return f"{where} bytes {start}..{start + size - 1}"


def plan_group(tags: Sequence[S7Tag], *, pdu: int, planner: S7Planner) -> ReadPlan:
    """Merge a scan group's tags into byte ranges, split ranges larger than a PDU, pack them into requests."""
    payload = payload_limit(pdu)
    by_block: dict[tuple[Area, int], list[Span[int]]] = defaultdict(list)
    for col, tag in enumerate(tags):
        by_block[(tag.address.area, tag.address.db)].append(Span(tag.address.byte, tag.size, col))
    ranges: list[tuple[Area, int, int, int, tuple[int, ...]]] = []  # area, db, start, size, cols
    for (area, db), spans in sorted(by_block.items()):
        big = [s for s in spans if s.size > payload]  # long strings on a small PDU: read in chunks
        reads = plan_reads(
            [s for s in spans if s.size <= payload],
            max_count=payload,
            max_gap=planner.max_gap,
            merge=planner.mode is PlannerMode.MERGE,
        )
        found = [(r.start, r.count, tuple(s.item for s in r.items)) for r in reads]
        found += [(s.start, s.size, (s.item,)) for s in big]
        ranges += [(area, db, start, size, cols) for start, size, cols in sorted(found)]
    items: list[PlannedItem] = []
    fields: list[CodecField] = []
    byte_fields: list[ByteField] = []
    texts: list[tuple[int, int, int]] = []
    nbytes = 0
    for area, db, start, size, cols in ranges:
        for col in cols:
            tag = tags[col]
            off = nbytes + tag.address.byte - start
            t = tag.dtype
            if t.type in _CODEC:
                fields.append(CodecField(col, off, _CODEC[t.type], ByteOrder.ABCD, tag.scale, tag.offset))
            elif t.type in (S7Type.CHAR, S7Type.STRING):
                texts.append((col, off, t.length))
            else:
                signed = t.type is S7Type.SINT
                byte_fields.append(ByteField(col, off, signed, tag.address.bit, tag.scale, tag.offset))
        for part in range(0, size, payload):
            n = min(payload, size - part)
            part_cols = [c for c in cols if _overlaps(tags[c], start + part, n)]
            items.append(
                PlannedItem(
                    area,
                    db,
                    start + part,
                    n,
                    nbytes + part,
                    np.asarray(part_cols, dtype=np.intp),
                    _label(area, db, start + part, n),
                )
            )
        nbytes += size
    requests = []
    for idx in pack_items([it.size for it in items], pdu=pdu, max_items=planner.max_items):
        chosen = tuple(items[i] for i in idx)
        requests.append(PlannedRequest(chosen, tuple((it.area.wire, it.db, it.start, it.size) for it in chosen)))
    # a scaled integer is a measurement: render it as a float
    kinds = tuple("float" if t.scale != 1.0 or t.offset != 0.0 else t.dtype.kind for t in tags)
    return ReadPlan(pdu, tuple(requests), kinds, nbytes, BlockDecoder(fields), ByteDecoder(byte_fields), tuple(texts))


def _overlaps(tag: S7Tag, start: int, size: int) -> bool:
    return tag.address.byte < start + size and start < tag.address.byte + tag.size


# ---------------------------------------------------------------- protocol


# item return codes worth explaining (the rest come from python-snap7's table)
_ITEM_ERRORS = {
    0x03: "access denied (S7-1200/1500: allow PUT/GET access and use a DB without optimised block access)",
    0x05: "invalid address (past the end of the DB or area)",
    0x0A: "object does not exist (no such DB)",
}


def _item_error(code: int) -> str:
    return f"{_ITEM_ERRORS.get(code) or get_return_code_description(code).lower()} (0x{code:02X})"


def _split_items(raw: bytes, count: int) -> list[bytes | int]:
    """Each item of a read answer's data section: its bytes, or its return code when it failed."""
    out: list[bytes | int] = []
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise S7ProtocolError(f"read answer truncated at item {i + 1} of {count}")
        code, transport, length = raw[pos], raw[pos + 1], raw[pos + 2] << 8 | raw[pos + 3]
        pos += 4
        if code != 0xFF:
            out.append(code)
            continue
        # BIT, BYTE/WORD/DWORD and INTEGER transport sizes count bits; the others bytes
        n = (length + 7) // 8 if transport in (0x03, 0x04, 0x05) else length
        if pos + n > len(raw):
            raise S7ProtocolError(f"read answer truncated in item {i + 1} of {count}")
        out.append(raw[pos : pos + n])
        pos += n + (n & 1 if i < count - 1 else 0)  # fill byte after odd data, except after the last item
    return out


def _exchange(client: snap7.Client, spec: Sequence[tuple[int, int, int, int]]) -> list[bytes | int]:
    """One read request with per-item results.

    python-snap7's read_multi_vars raises on the first failed item and re-plans the request by
    itself; we need each item's own return code, so we send the request its protocol object builds
    and split the answer here.
    """
    request = client.protocol.build_multi_read_request(list(spec))
    response = client.protocol.parse_response(bytes(client.iso_exchange_buffer(bytearray(request))))
    if response["sequence"] != client.protocol.sequence:
        raise S7ProtocolError(f"answer {response['sequence']} to request {client.protocol.sequence}: out of step")
    params = response.get("parameters") or {}
    if params.get("function_code") != 0x04 or params.get("item_count") != len(spec):
        raise S7ProtocolError(f"unexpected answer to a read of {len(spec)} items: {params}")
    return _split_items(response.get("raw_data", b""), len(spec))


@dataclass
class _Result:
    values: FloatArray
    quality: QualityArray
    exact: dict[int, Value]
    failed: list[tuple[PlannedItem, str]]
    answered: list[PlannedItem]


# ---------------------------------------------------------------- runtime


class S7Driver(DriverBase):
    """Reads an S7 PLC: one connection, one request at a time on its own worker thread, planned reads."""

    def __init__(self, config: S7Device) -> None:
        super().__init__(config.name)
        self.config = config
        self.pdu = config.pdu_size  # the PDU the current plans are made for
        self._client: snap7.Client | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()  # one request at a time on the connection
        self._parts = PartFailures(self.name, log)
        self._tags: dict[ScanGroup, list[S7Tag]] = {}
        self._plans: dict[ScanGroup, ReadPlan] = {}
        by_interval: dict[float, list[S7Tag]] = defaultdict(list)
        for tag in config.tags:
            by_interval[config.interval_of(tag)].append(tag)
        for interval, tags in sorted(by_interval.items()):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self.groups.append(group)
            self._tags[group] = tags
        self._plans = self._plan_all(self.pdu)

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Requests each scan group sends per cycle."""
        return {g.interval: len(self._plans[g].requests) for g in self.groups}

    def plan(self) -> list[str]:
        """Tags and requests per scan group."""
        per = self.requests_per_cycle
        return [f"{len(g.tags)} tags every {g.interval:g}s in {per[g.interval]} requests" for g in self.groups]

    @property
    def items_per_cycle(self) -> dict[float, int]:
        """Byte ranges (request items) each scan group reads per cycle."""
        return {g.interval: sum(len(r.items) for r in self._plans[g].requests) for g in self.groups}

    def _plan_all(self, pdu: int) -> dict[ScanGroup, ReadPlan]:
        return {g: plan_group(self._tags[g], pdu=pdu, planner=self.config.planner) for g in self.groups}

    def _endpoint(self) -> str:
        cfg = self.config
        if cfg.remote_tsap is not None:
            local, remote = cfg.tsaps
            return f"{cfg.host}:{cfg.port} TSAP {local:04X}/{remote:04X}"
        return f"{cfg.host}:{cfg.port} rack {cfg.rack} slot {cfg.slot}"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking client call on this connection's thread (the thread also orders calls)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"s7-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def connect(self) -> None:
        """Open the ISO-on-TCP connection, negotiate the PDU, re-plan the reads if the PLC granted another size."""
        await self.close()
        async with self._lock:
            try:
                pdu, plans = await self._call(self._connect_blocking)
            except S7TimeoutError as exc:
                raise DeviceError(
                    self.name, f"cannot connect to {self._endpoint()}: no answer within {self.config.timeout:g}s"
                ) from exc
            except (S7Error, OSError) as exc:
                raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: {exc}") from exc
        if plans is not None:
            before = sum(self.requests_per_cycle.values())
            self._plans, self.pdu = plans, pdu
            log.info(
                "device %s: the PLC granted a %d-byte PDU (asked %d): %d requests per cycle instead of %d",
                self.name,
                pdu,
                self.config.pdu_size,
                sum(self.requests_per_cycle.values()),
                before,
            )

    def _connect_blocking(self) -> tuple[int, dict[ScanGroup, ReadPlan] | None]:
        cfg = self.config
        self._disconnect_blocking()
        client = snap7.Client()
        local, remote = cfg.tsaps
        client.set_param(Parameter.PDURequest, cfg.pdu_size)
        client.set_connection_params(cfg.host, local, remote)
        client.port = cfg.port
        # Client.connect opens the connection with python-snap7's own 5 s for the TCP connect, the COTP
        # handshake and the PDU negotiation; the same steps here take the device's timeout, which then
        # holds for every receive too (python-snap7 3.3 internals: see the pin in pyproject.toml)
        conn = ISOTCPConnection(cfg.host, cfg.port, local_tsap=local, remote_tsap=remote)
        client.connection = conn
        # stored before anything can block, so close() finds it even if the caller gave up waiting
        self._client = client
        try:
            conn.connect(timeout=cfg.timeout)
            client._setup_communication()
        except BaseException:
            with contextlib.suppress(S7Error, OSError):
                client.disconnect()
            if self._client is client:  # not a newer connection's, should this one have been given up on
                self._client = None
            raise
        client.connected = True
        pdu = client.get_pdu_length()
        # planned here, off the event loop: ten thousand tags take a few tens of milliseconds
        return pdu, (None if pdu == self.pdu else self._plan_all(pdu))

    async def close(self) -> None:
        """Close the connection and its thread; safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        self._abort_connect()
        try:
            # queued behind a request still running, so the connection is never closed under it
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect_blocking)
        finally:
            executor.shutdown(wait=False)

    def _abort_connect(self) -> None:
        """Shut the socket of a connect still in progress, so its thread gives up now and not after the timeout."""
        client = self._client
        conn = client.connection if client is not None else None
        sock = conn.socket if conn is not None else None
        if client is not None and not client.connected and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in connect() or recv()

    def _disconnect_blocking(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except (S7Error, OSError) as exc:
                log.debug("device %s: disconnect: %s", self.name, exc)

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Send the group's planned requests on the worker thread, decode every tag in one pass per type."""
        plan = self._plans[group]
        async with self._lock:
            if self._client is None:
                raise DeviceError(self.name, "not connected")
            try:
                ts, result = await self._call(self._read_blocking, plan)
            except (S7Error, OSError) as exc:
                raise DeviceError(self.name, f"read failed: {exc or type(exc).__name__}") from exc
        for item, why in result.failed:
            self._parts.failed(item.label, [group.tags[c] for c in item.cols], why)
        for item in result.answered:
            self._parts.answered(item.label)
        return SampleBatch(self.name, ts, group.tags, result.values, result.quality, result.exact, plan.kinds)

    def _read_blocking(self, plan: ReadPlan) -> tuple[float, _Result]:
        client = self._client
        if client is None or client.connection is None or not client.connection.connected:
            raise S7ProtocolError("not connected")
        ts = time.time()
        n = len(plan.kinds)
        block = np.zeros(plan.nbytes, dtype=np.uint8)
        failed: list[tuple[PlannedItem, str]] = []
        answered: list[PlannedItem] = []
        for req in plan.requests:
            try:
                answers = _exchange(client, req.spec)
            except S7ProtocolError as exc:
                if not exc.error_code:
                    raise  # a malformed answer: the connection is out of step
                failed += [(it, f"refused the request: {exc}") for it in req.items]
                continue
            for it, answer in zip(req.items, answers, strict=True):
                if isinstance(answer, int):
                    failed.append((it, _item_error(answer)))
                elif len(answer) < it.size:
                    failed.append((it, f"short answer: {len(answer)} of {it.size} bytes"))
                else:
                    block[it.buf_offset : it.buf_offset + it.size] = np.frombuffer(answer, np.uint8, it.size)
                    answered.append(it)
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.zeros(n, dtype=np.uint8)
        exact: dict[int, Value] = {}
        plan.word_decoder.decode(block, values, quality, exact)
        plan.byte_decoder.decode(block, values)
        for col, off, length in plan.texts:
            if length == 0:
                exact[col] = bytes(block[off : off + 1]).decode("latin-1")
            else:
                # STRING[n]: max length, actual length, then n characters of which `actual` count
                actual = min(int(block[off + 1]), length)
                exact[col] = bytes(block[off + 2 : off + 2 + actual]).decode("latin-1")
        for it, _ in failed:
            mark_bad(values, quality, exact, it.cols)
        return ts, _Result(values, quality, exact, failed, answered)

    @property
    def request_errors(self) -> int:
        """Items that failed on their own (bad address, wrong area) while the connection was fine."""
        return self._parts.count


def _quiet_snap7() -> None:
    """python-snap7 logs every connect, disconnect and PDU negotiation at INFO; the driver reports those."""
    lib = logging.getLogger("snap7")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.WARNING)


_quiet_snap7()

PLUGIN = DriverPlugin(
    key="s7",
    config=S7Device,
    runtime="edge_agent.drivers.s7:S7Driver",
    extra="s7",
    library="snap7",
    simulator="edge_agent.simulate.s7_server:S7PlantServer",
)
