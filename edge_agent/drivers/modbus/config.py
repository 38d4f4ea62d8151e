"""Modbus device and tag config: addresses as engineers write them, types, byte orders, planner settings.

Imports no protocol library: loading a config never needs pymodbus.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer, PlainValidator, model_validator

from edge_agent.drivers.base import DeviceBase, TagBase, overlaps
from edge_agent.drivers.codecs import ByteOrder, DataType, width_of
from edge_agent.errors import FieldError
from edge_agent.fields import StrictModel

MAX_REGISTERS = 125  # Modbus spec cap for function codes 3 and 4
MAX_BITS = 2000  # Modbus spec cap for function codes 1 and 2
LAST_ADDRESS = 65535
ILLEGAL_ADDRESS = 2
# exception codes of the Modbus spec, named in logs so nobody needs the spec at hand
_EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class Table(StrEnum):
    """The four Modbus data tables."""

    COIL = "coil"
    DISCRETE = "discrete"
    INPUT = "input"
    HOLDING = "holding"

    @property
    def is_bits(self) -> bool:
        """Coils and discrete inputs hold single bits; the others 16-bit registers."""
        return self in (Table.COIL, Table.DISCRETE)


_MODICON_TABLE = {"0": Table.COIL, "1": Table.DISCRETE, "3": Table.INPUT, "4": Table.HOLDING}
_MODICON_DIGIT = {table: digit for digit, table in _MODICON_TABLE.items()}
_EXPLICIT_TABLE = {
    "coil": Table.COIL,
    "coils": Table.COIL,
    "co": Table.COIL,
    "discrete": Table.DISCRETE,
    "di": Table.DISCRETE,
    "input": Table.INPUT,
    "ir": Table.INPUT,
    "holding": Table.HOLDING,
    "hr": Table.HOLDING,
}
_MODICON_RE = re.compile(r"^(\d)(\d{4,5})(?:\.(\d{1,2}))?$")
_EXPLICIT_RE = re.compile(r"^([a-z]+)\s*:\s*(0x[0-9a-f]+|\d+)(?:\.(\d{1,2}))?$", re.IGNORECASE)
_ADDRESS_HELP = (
    "write a Modicon address (40001 holding, 30001 input, 00001 coil, 10001 discrete; 1-based, "
    "6 digits up to 465536) or table:offset (holding:0, input:0, coil:0, discrete:0; 0-based), "
    "with .N for one bit of a register (40001.3)"
)


@dataclass(frozen=True, slots=True)
class ModbusAddress:
    """A parsed address: table, 0-based index on the wire, and an optional bit of a register."""

    table: Table
    index: int
    bit: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.table}:{self.index}" + (f".{self.bit}" if self.bit is not None else "")

    @property
    def modicon_digits(self) -> int:
        """5 or 6 when written as a Modicon address (40001, 400001); 0 when written table:offset."""
        m = _MODICON_RE.match(self.text)
        return 1 + len(m.group(2)) if m else 0


def range_text(table: Table, start: int, count: int, modicon: int = 0) -> str:
    """Units start … start+count-1 of a table as an engineer writes them; one address when count is 1.

    `modicon` is the digits of the Modicon form the tags were written in (5: 40001–40125, 6:
    400001–400125; 5 digits reach 9999 only), 0 for table:offset (holding:0–124).
    """
    last = start + count - 1
    if not modicon:
        return f"{table}:{start}" + (f"–{last}" if count > 1 else "")
    digits = 6 if modicon > 5 or last >= 9999 else 5
    first, end = (f"{_MODICON_DIGIT[table]}{i + 1:0{digits - 1}d}" for i in (start, last))
    return first + (f"–{end}" if count > 1 else "")


def parse_address(value: Any) -> ModbusAddress:
    """Parse `40001`, `400001`, `holding:0`, `40001.3`, … into a ModbusAddress."""
    if isinstance(value, ModbusAddress):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not an address: {_ADDRESS_HELP}")
    text = str(value).strip()
    if isinstance(value, int) and len(text) < 5:
        raise ValueError(
            f"{value} is not an address: Modicon addresses have 5 or 6 digits; a coil address "
            f"such as 00001 must be quoted ('00001') or YAML reads it as the number 1"
        )
    bit: int | None = None
    m = _MODICON_RE.match(text)
    if m:
        digit, rest, bit_text = m.groups()
        if digit not in _MODICON_TABLE:
            raise ValueError(f"{text!r}: no Modbus table starts with {digit}; {_ADDRESS_HELP}")
        table, number = _MODICON_TABLE[digit], int(rest)
        top = 9999 if len(rest) == 4 else LAST_ADDRESS + 1
        if not 1 <= number <= top:
            raise ValueError(f"{text!r}: Modicon addresses count from 1 up to {digit}{top:0{len(rest)}d}")
        index = number - 1
    else:
        m = _EXPLICIT_RE.match(text)
        if not m or m.group(1).lower() not in _EXPLICIT_TABLE:
            raise ValueError(f"{text!r} is not an address: {_ADDRESS_HELP}")
        name, number_text, bit_text = m.groups()
        table, index = _EXPLICIT_TABLE[name.lower()], int(number_text, 0)
        if index > LAST_ADDRESS:
            raise ValueError(f"{text!r}: offsets run from 0 to {LAST_ADDRESS}")
    if bit_text is not None:
        bit = int(bit_text)
        if table.is_bits:
            raise ValueError(f"{text!r}: a bit number applies to registers, not to {table} addresses")
        if not 0 <= bit <= 15:
            raise ValueError(f"{text!r}: a register has bits 0 to 15")
    return ModbusAddress(table, index, bit, text)


Address = Annotated[ModbusAddress, PlainValidator(parse_address), PlainSerializer(str)]


class Transport(StrEnum):
    """How Modbus frames travel."""

    TCP = "tcp"  # Modbus TCP (MBAP header), the usual case
    RTU_OVER_TCP = "rtu_over_tcp"  # RTU frames through a serial-to-Ethernet gateway
    RTU = "rtu"  # RTU on a local serial port


class Parity(StrEnum):
    """Serial parity."""

    NONE = "N"
    EVEN = "E"
    ODD = "O"


class SerialSettings(StrictModel):
    """Serial line settings for `transport: rtu`."""

    port: str = Field(description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(19200, ge=300, le=921600)
    parity: Parity = Parity.EVEN
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8


class PlannerMode(StrEnum):
    """Whether neighbouring tags are read together."""

    MERGE = "merge"  # fewest requests within the caps and max gaps
    NONE = "none"  # one request per tag (devices that reject multi-register reads)


class Planner(StrictModel):
    """How tags are coalesced into requests."""

    mode: PlannerMode = PlannerMode.MERGE
    max_gap: int = Field(16, ge=0, le=MAX_REGISTERS, description="unused registers a merged read may span between tags")
    max_gap_bits: int = Field(256, ge=0, le=MAX_BITS, description="unused coils/inputs a merged read may span")
    max_registers: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS, description="registers per request")
    max_bits: int = Field(MAX_BITS, ge=1, le=MAX_BITS, description="coils or discrete inputs per request")


class ModbusTag(TagBase):
    """One value on a Modbus device."""

    address: Address
    type: DataType | None = Field(None, description="value type; default bool for coils/discrete, uint16 otherwise")
    byte_order: ByteOrder | None = Field(None, description="overrides the device's byte_order")
    scale: float = Field(1.0, description="value = raw × scale + offset")
    offset: float = 0.0
    length: int | None = Field(None, ge=1, le=2 * MAX_REGISTERS, description="string length in characters")

    @property
    def dtype(self) -> DataType:
        """The tag's type, with the table's default applied."""
        if self.type is not None:
            return self.type
        return DataType.BOOL if self.address.table.is_bits or self.address.bit is not None else DataType.UINT16

    def where(self) -> str:
        """The address as written (40001, holding:0, 40001.3)."""
        return str(self.address)

    @property
    def float32(self) -> bool:
        """float32 values unscaled are printed as written (3.14159, not 3.141590118408203)."""
        return self.dtype is DataType.FLOAT32 and self.scale == 1.0 and self.offset == 0.0

    def span(self) -> float | None:
        """`range`, else a 16-bit integer's full scale times `scale` (wider types give no useful span)."""
        if self.range is not None or self.dtype not in (DataType.INT16, DataType.UINT16):
            return super().span()
        return 65535.0 * abs(self.scale)

    @property
    def size(self) -> int:
        """Registers (or bits) the tag occupies."""
        if self.address.table.is_bits:
            return 1
        return width_of(self.dtype, self.length or 0) // 2

    @model_validator(mode="after")
    def _fits_table(self) -> ModbusTag:
        a, t = self.address, self.dtype
        if a.table.is_bits and t is not DataType.BOOL:
            raise FieldError("type", f"{a.table} addresses hold single bits: type must be bool, not {t}")
        if a.bit is not None and t is not DataType.BOOL:
            raise FieldError("type", f"address {a} names one bit: type must be bool, not {t}")
        if t is DataType.STRING and not self.length:
            raise FieldError("length", "a string tag needs length: the number of characters")
        if t is not DataType.STRING and self.length is not None:
            raise FieldError("length", f"length applies to strings only, not to {t}")
        if t in (DataType.BOOL, DataType.STRING) and (self.scale != 1.0 or self.offset != 0.0):
            raise FieldError(
                "scale" if self.scale != 1.0 else "offset", f"scale and offset apply to numbers, not to {t}"
            )
        if self.scale == 0:
            raise FieldError("scale", "scale 0 would turn every value into the offset")
        if a.index + self.size - 1 > LAST_ADDRESS:
            raise FieldError("address", f"{a} with {self.size} registers runs past the end of the {a.table} table")
        return self


class ModbusDevice(DeviceBase):
    """A Modbus TCP server, RTU-over-TCP gateway or RTU serial device."""

    type: Literal["modbus"]
    transport: Transport = Transport.TCP
    host: str | None = Field(None, description="IP address or hostname (tcp, rtu_over_tcp)")
    port: int = Field(502, ge=1, le=65535)
    serial: SerialSettings | None = Field(None, description="serial line (transport: rtu)")
    unit: int = Field(1, ge=0, le=255, description="unit / slave / device id")
    byte_order: ByteOrder = ByteOrder.ABCD
    planner: Planner = Planner()
    tags: list[ModbusTag] = Field(min_length=1)

    @model_validator(mode="after")
    def _transport_fields(self) -> ModbusDevice:
        if self.transport is Transport.RTU:
            if self.serial is None:
                raise FieldError("transport", "transport rtu needs serial: {port: /dev/ttyUSB0, baudrate: 19200, …}")
            if self.host is not None:
                raise FieldError("host", "host applies to tcp and rtu_over_tcp; transport rtu uses serial.port")
        elif self.host is None:
            raise FieldError("host", f"required for transport {self.transport}: the device's IP address or name")
        elif self.serial is not None:
            raise FieldError("serial", f"serial settings apply to transport rtu, not {self.transport}")
        return self

    def notation(self) -> dict[Table, int]:
        """How each table's requests are named: the Modicon digits (5 or 6) when every tag of that table was
        written Modicon-style (40001, 400001), 0 for table:offset (holding:0) when any was written so."""
        digits: dict[Table, list[int]] = defaultdict(list)
        for tag in self.tags:
            digits[tag.address.table].append(tag.address.modicon_digits)
        return {table: 0 if 0 in d else max(d) for table, d in digits.items()}

    def check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Overlapping addresses, and tags too large for one request."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        by_table: dict[Table, list[tuple[int, ModbusTag]]] = defaultdict(list)
        for i, tag in enumerate(self.tags):
            by_table[tag.address.table].append((i, tag))
            cap = self.planner.max_bits if tag.address.table.is_bits else self.planner.max_registers
            if tag.size > cap:
                problems.append((("tags", i, "length"), f"{tag.size} registers do not fit one request (max {cap})"))
        for entries in by_table.values():
            extents = ((i, t.address.index, t.address.bit, t.size) for i, t in entries)
            for i, j in overlaps(extents):
                tag, other = self.tags[i], self.tags[j]
                n = f"{other.size} register{'s' if other.size > 1 else ''}"
                problems.append(
                    (("tags", i, "address"), f"{tag.address} ({tag.name}) overlaps {other.address} ({other.name}, {n})")
                )
        return problems


def exception_text(code: int | None) -> str:
    """`exception code 11 (gateway target device failed to respond)`."""
    name = _EXCEPTIONS.get(code) if code is not None else None
    return f"exception code {code if code is not None else '?'}" + (f" ({name})" if name else "")
