"""S7 device and tag config: Siemens addresses, S7 types, TSAPs, connection and planner settings.

Imports no protocol library: loading a config never needs python-snap7.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from edge_agent.drivers.base import DeviceBase, TagBase, overlaps
from edge_agent.errors import FieldError
from edge_agent.fields import StrictModel

MAX_ITEMS = 20  # variables per multi-read request (S7 protocol; python-snap7 raises beyond)
LAST_BYTE = 65535  # byte offsets of standard (non-optimised) DBs and of the M/I/Q areas fit 16 bits
DEFAULT_PDU = 480
MIN_PDU, MAX_PDU = 240, 960


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

    @property
    def letter(self) -> str:
        """The area letter as written: E and A for inputs and outputs written in German mnemonics, else the English."""
        written = self.text.strip().lstrip("%")[:1].upper()
        return written if _AREA_LETTER.get(written) is self.area else str(self.area)


def range_text(area: Area, db: int, start: int, size: int, letter: str = "") -> str:
    """Bytes start … start+size-1 of an area as an engineer writes them: DB10.DBB0–DBB479, MB0–MB7, IB0–IB3.

    One byte alone when size is 1 (DB10.DBB4); `letter` is the area's letter as the tags write it (E for I).
    """
    first = f"DB{db}.DBB{start}" if area is Area.DB else f"{letter or area}B{start}"
    if size == 1:
        return first
    return f"{first}–{'DB' if area is Area.DB else letter or area}B{start + size - 1}"


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


# full scale of the integer types small enough for a percent deadband of their raw range to mean something
_SMALL_INTS = {
    S7Type.BYTE: 255.0,
    S7Type.SINT: 255.0,
    S7Type.USINT: 255.0,
    S7Type.INT: 65535.0,
    S7Type.UINT: 65535.0,
    S7Type.WORD: 65535.0,
}
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

    @property
    def float32(self) -> bool:
        """REAL values are printed as written (3.14159, not 3.141590118408203)."""
        return self.dtype.type is S7Type.REAL

    def span(self) -> float | None:
        """`range`, else an 8- or 16-bit integer's full scale times `scale` (wider types give no useful span)."""
        t = self.dtype.type
        if self.range is not None or t not in _SMALL_INTS:
            return super().span()
        return _SMALL_INTS[t] * abs(self.scale)

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

    def area_letters(self) -> dict[Area, str]:
        """The letter each area's requests are named with: E/A when every input/output tag was written so, else I/Q."""
        letters: dict[Area, set[str]] = defaultdict(set)
        for tag in self.tags:
            letters[tag.address.area].add(tag.address.letter)
        return {area: found.pop() if len(found) == 1 else str(area) for area, found in letters.items()}

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
