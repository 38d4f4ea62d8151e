"""Modbus TCP / RTU driver: config model, address parsing, read planning and the runtime client."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, PlainSerializer, PlainValidator, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from edge_agent.drivers.base import (
    DeviceBase,
    DriverPlugin,
    PartFailure,
    PartFailures,
    ScanGroup,
    TagBase,
    mark_bad,
    overlaps,
    register,
)
from edge_agent.drivers.codecs import BlockDecoder, ByteOrder, DataType, kind_of, width_of
from edge_agent.drivers.codecs import Field as CodecField
from edge_agent.drivers.planner import Read, Span, plan_reads
from edge_agent.errors import DeviceError, FieldError
from edge_agent.fields import StrictModel
from edge_agent.types import SampleBatch, Value

log = logging.getLogger(__name__)

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


class _RawHoldingResponse(ReadHoldingRegistersResponse):
    """A register response that keeps the payload as bytes for numpy, instead of a list of ints.

    pymodbus unpacks each register with struct and formats the PDU for a debug log on every
    response; at 125 registers that is most of the client's CPU per request. Registered on our
    client only, through pymodbus's custom-response API.
    """

    function_code = 3

    def decode(self, data: bytes) -> None:
        """Keep the register bytes (wire order) of the response."""
        n = int(data[0])
        if n >= len(data):
            raise ModbusIOException(f"byte_count {n} > length of packet {len(data)}", function_code=self.function_code)
        self.raw = bytes(data[1 : 1 + n])
        self.registers = []

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, {len(self.raw)} bytes)"


class _RawInputResponse(_RawHoldingResponse):
    """The same for input registers (function code 4)."""

    function_code = 4


@dataclass(frozen=True, eq=False)  # identity hash: arrays inside
class _Request:
    table: Table
    start: int
    count: int
    cols: npt.NDArray[np.intp]
    buf_offset: int  # registers: where the answer goes in the group's byte buffer
    bit_offsets: npt.NDArray[np.intp] | None  # coils / discrete inputs
    label: str
    spans: tuple[Span[int], ...]  # the tags it reads (item: column), to split it when the device refuses a gap

    @staticmethod
    def of(table: Table, r: Read[int], buf_offset: int) -> _Request:
        """The request for one planned read whose answer goes at `buf_offset` of the group's buffer."""
        cols = np.asarray([s.item for s in r.items], dtype=np.intp)
        label = f"{table} {r.start}..{r.start + r.count - 1}"
        if table.is_bits:
            offs = np.asarray([s.start - r.start for s in r.items], dtype=np.intp)
            return _Request(table, r.start, r.count, cols, 0, offs, label, r.items)
        return _Request(table, r.start, r.count, cols, buf_offset, None, label, r.items)

    def runs(self) -> tuple[_Request, ...]:
        """Its runs of contiguous tags (the reads max_gap 0 would plan), each writing where it did; () if just one."""
        reads = plan_reads(self.spans, max_count=self.count, max_gap=0)
        if len(reads) < 2:
            return ()
        return tuple(_Request.of(self.table, r, self.buf_offset + 2 * (r.start - self.start)) for r in reads)


@dataclass(frozen=True)
class _GroupPlan:
    requests: tuple[_Request, ...]
    kinds: tuple[str, ...]
    nbytes: int  # register answers of one cycle, back to back
    decoder: BlockDecoder  # decodes every register tag of the group in one pass


class ModbusDriver:
    """Reads a Modbus device: one connection, one request at a time, planned reads."""

    def __init__(self, config: ModbusDevice) -> None:
        self.config = config
        self.name = config.name
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._dropped = False  # the device closed the connection under us (pymodbus only says "not connected")
        self._parts = PartFailures(self.name, log)
        self._splits_logged = False
        self.groups: list[ScanGroup] = []
        self._plans: dict[ScanGroup, _GroupPlan] = {}
        by_interval: dict[float, list[ModbusTag]] = defaultdict(list)
        for tag in config.tags:
            by_interval[config.interval_of(tag)].append(tag)
        for interval, tags in sorted(by_interval.items()):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self.groups.append(group)
            self._plans[group] = self._plan(tags)

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Requests each scan group sends per cycle."""
        return {g.interval: len(self._plans[g].requests) for g in self.groups}

    def _plan(self, tags: list[ModbusTag]) -> _GroupPlan:
        cfg = self.config
        merge = cfg.planner.mode is PlannerMode.MERGE
        by_table: dict[Table, list[Span[int]]] = defaultdict(list)
        for col, tag in enumerate(tags):
            by_table[tag.address.table].append(Span(tag.address.index, tag.size, col))
        requests: list[_Request] = []
        fields: list[CodecField] = []
        nbytes = 0
        for table, spans in by_table.items():
            bits = table.is_bits
            reads = plan_reads(
                spans,
                max_count=cfg.planner.max_bits if bits else cfg.planner.max_registers,
                max_gap=cfg.planner.max_gap_bits if bits else cfg.planner.max_gap,
                merge=merge,
            )
            for r in reads:
                requests.append(_Request.of(table, r, nbytes))
                if bits:
                    continue
                for s in r.items:
                    tag = tags[s.item]
                    fields.append(
                        CodecField(
                            col=s.item,
                            byte_offset=nbytes + 2 * (s.start - r.start),
                            dtype=tag.dtype,
                            order=tag.byte_order or cfg.byte_order,
                            scale=tag.scale,
                            offset=tag.offset,
                            bit=tag.address.bit,
                            length=tag.length or 0,
                        )
                    )
                nbytes += 2 * r.count
        # a scaled integer is a measurement: render it as a float
        kinds = tuple("float" if t.scale != 1.0 or t.offset != 0.0 else kind_of(t.dtype) for t in tags)
        return _GroupPlan(tuple(requests), kinds, nbytes, BlockDecoder(fields))

    def _endpoint(self) -> str:
        cfg = self.config
        if cfg.transport is Transport.RTU:
            assert cfg.serial is not None
            return f"{cfg.serial.port} unit {cfg.unit}"
        return f"{cfg.host}:{cfg.port} unit {cfg.unit}"

    async def connect(self) -> None:
        """Open the TCP connection or serial port."""
        await self.close()
        cfg = self.config
        # pymodbus retries and reconnects are off: the poller owns backoff and failure accounting
        common: dict[str, Any] = {
            "timeout": cfg.timeout,
            "retries": 0,
            "reconnect_delay": 0,
            "trace_connect": self._link_changed,
        }
        if cfg.transport is Transport.RTU:
            assert cfg.serial is not None
            s = cfg.serial
            client: AsyncModbusTcpClient | AsyncModbusSerialClient = AsyncModbusSerialClient(
                s.port,
                framer=FramerType.RTU,
                baudrate=s.baudrate,
                parity=s.parity.value,
                stopbits=s.stopbits,
                bytesize=s.bytesize,
                **common,
            )
        else:
            assert cfg.host is not None
            framer = FramerType.RTU if cfg.transport is Transport.RTU_OVER_TCP else FramerType.SOCKET
            client = AsyncModbusTcpClient(cfg.host, port=cfg.port, framer=framer, **common)
        client.register(_RawHoldingResponse)
        client.register(_RawInputResponse)
        try:
            async with asyncio.timeout(cfg.timeout + 1.0):
                ok = await client.connect()
        except (OSError, TimeoutError, ModbusException) as exc:
            client.close()
            raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: {exc or type(exc).__name__}") from exc
        if not ok:
            client.close()
            raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: connection refused or timed out")
        self._client = client
        self._dropped = False

    def _link_changed(self, up: bool) -> None:
        # pymodbus calls this when the connection ends by itself; our own close() does not
        if not up:
            self._dropped = True

    async def close(self) -> None:
        """Close the connection."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self, group: ScanGroup) -> SampleBatch:
        """Send the group's planned requests one after another, then decode every register tag at once."""
        client = self._client
        if client is None or not client.connected:
            raise DeviceError(self.name, "the device closed the connection" if self._dropped else "not connected")
        plan = self._plans[group]
        n = len(group.tags)
        ts = time.time()
        values = np.full(n, np.nan, dtype=np.float64)
        quality = np.zeros(n, dtype=np.uint8)
        exact: dict[int, Value] = {}
        block = np.zeros(plan.nbytes, dtype=np.uint8)
        failed: list[_Request] = []
        failures: list[PartFailure] = []
        answered: list[str] = []
        splits: list[tuple[_Request, tuple[_Request, ...]]] = []
        unit = self.config.unit
        calls = {
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
            Table.COIL: client.read_coils,
            Table.DISCRETE: client.read_discrete_inputs,
        }
        task = asyncio.current_task()
        pending = list(plan.requests)
        i = 0
        while i < len(pending):  # bounded: a request splits once, into runs that cannot split again
            req = pending[i]
            i += 1
            if task is not None and task.cancelling():
                # Python 3.11's wait_for (inside pymodbus) can swallow a cancellation that meets a reply:
                # honour it here, or a shutdown waits for a whole group, and the next, forever
                raise asyncio.CancelledError
            try:
                rr = await calls[req.table](req.start, count=req.count, device_id=unit)
            except (ModbusException, OSError, TimeoutError) as exc:
                raise DeviceError(self.name, f"{req.label}: {self._no_answer(exc)}") from exc
            if rr.isError():
                code = getattr(rr, "exception_code", None)
                runs = req.runs() if code == ILLEGAL_ADDRESS else ()
                if runs:
                    # the gap it bridged is unmapped on this device: read the tags' own runs, now and from now on
                    pending[i:i] = runs
                    splits.append((req, runs))
                    continue
                failures.append(self._failure(req, group, f"answered {_exception_text(code)}"))
                failed.append(req)
                continue
            if req.bit_offsets is not None:
                bits = np.asarray(rr.bits[: req.count], dtype=np.float64)
                values[req.cols] = bits[req.bit_offsets]
            else:
                raw: bytes = getattr(rr, "raw", b"")
                if len(raw) < 2 * req.count:
                    why = f"short answer: {len(raw) // 2} of {req.count} registers"
                    failures.append(self._failure(req, group, why))
                    failed.append(req)
                    continue
                block[req.buf_offset : req.buf_offset + 2 * req.count] = np.frombuffer(raw, np.uint8, 2 * req.count)
            answered.append(req.label)
        if splits:
            self._replace_split(group, splits)
        self._parts.scan(f"the {group.interval:g}s scan", failures, answered)
        plan.decoder.decode(block, values, quality, exact)
        for req in failed:
            mark_bad(values, quality, exact, req.cols)
        return SampleBatch(self.name, ts, group.tags, values, quality, exact, plan.kinds)

    def _no_answer(self, exc: BaseException) -> str:
        """Why a request got no answer, in words: pymodbus's own text names its retries, not the cause."""
        if isinstance(exc, ModbusIOException) and "No response" in str(exc):
            text = f"no answer within {self.config.timeout:g}s"
        else:
            text = str(exc) or type(exc).__name__
        return text + ("; the device closed the connection" if self._dropped else "")

    def _failure(self, req: _Request, group: ScanGroup, why: str) -> PartFailure:
        hint = " (if the device leaves gaps unmapped, lower planner.max_gap)" if req.runs() else ""
        return PartFailure(req.label, [group.tags[c] for c in req.cols], why, hint)

    def _replace_split(self, group: ScanGroup, splits: list[tuple[_Request, tuple[_Request, ...]]]) -> None:
        """Put the runs of refused requests in the group's plan, in their place; the buffer layout is unchanged."""
        plan = self._plans[group]
        by_req = dict(splits)
        requests = tuple(r for req in plan.requests for r in by_req.get(req, (req,)))
        self._plans[group] = dataclasses.replace(plan, requests=requests)
        what = "; ".join(f"{req.label} into {', '.join(r.label for r in runs)}" for req, runs in splits)
        level = logging.DEBUG if self._splits_logged else logging.WARNING
        self._splits_logged = True
        log.log(
            level,
            "device %s: a read across unmapped addresses answered exception code 2 (illegal data address): "
            "split %s (%d requests per cycle now; a planner.max_gap below the gaps avoids the first refusal)",
            self.name,
            what,
            len(requests),
        )

    @property
    def request_errors(self) -> int:
        """Requests that failed on their own (exception answers, short answers)."""
        return self._parts.count


def _exception_text(code: int | None) -> str:
    """`exception code 11 (gateway target device failed to respond)`."""
    name = _EXCEPTIONS.get(code) if code is not None else None
    return f"exception code {code if code is not None else '?'}" + (f" ({name})" if name else "")


PLUGIN = register(DriverPlugin(key="modbus", config=ModbusDevice, factory=ModbusDriver))
