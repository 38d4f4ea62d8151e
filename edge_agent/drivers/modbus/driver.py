"""Modbus TCP / RTU runtime: one client per device, planned block reads, one numpy decode per scan."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse
from pymodbus.transaction import TransactionManager

from edge_agent.drivers.base import (
    DriverBase,
    PartFailure,
    PartFailures,
    Request,
    ScanGroup,
    group_by_interval,
    mark_bad,
)
from edge_agent.drivers.codecs import BlockDecoder, kind_of
from edge_agent.drivers.codecs import Field as CodecField
from edge_agent.drivers.modbus.config import (
    ILLEGAL_ADDRESS,
    ModbusDevice,
    ModbusTag,
    PlannerMode,
    Table,
    Transport,
    exception_text,
    range_text,
)
from edge_agent.drivers.planner import Read, Span, plan_reads
from edge_agent.errors import DeviceError
from edge_agent.types import SampleBatch, Value

log = logging.getLogger("edge_agent.drivers.modbus")

# server device failure, gateway path unavailable, gateway target failed to respond
_WRONG_UNIT_CODES = frozenset({4, 10, 11})


# the read function code of each table, and its name in the spec (named in logs: nobody needs the spec at hand)
_FUNCTION = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}
_FUNCTION_NAMES = {1: "read coils", 2: "read discrete inputs", 3: "read holding registers", 4: "read input registers"}
_UNITS = {Table.COIL: "coil", Table.DISCRETE: "discrete input", Table.INPUT: "register", Table.HOLDING: "register"}


class _Raw(ModbusPDU):
    """A read response that keeps its byte count and the bytes after it as they came, for numpy and for checks.

    pymodbus unpacks each register with struct (each bit into a list) and formats the PDU for a debug log on
    every response; at 125 registers that is most of the client's CPU per request. Nor does it check the
    byte count against anything: the driver checks it against the frame and its request (`_mismatch`).
    Decoding never raises: a raise here becomes asyncio's "Fatal error: protocol.data_received() call
    failed" with a traceback. Registered on our client only, through pymodbus's custom-response API.
    """

    byte_count: int = -1  # -1: the answer had no byte count at all
    raw: bytes = b""

    def decode(self, data: bytes) -> None:
        """Keep the byte count and the data bytes (wire order) of the response."""
        self.byte_count = int(data[0]) if data else -1
        self.raw = bytes(data[1:])

    def __str__(self) -> str:
        return f"{type(self).__name__}(dev_id={self.dev_id}, byte count {self.byte_count}, {len(self.raw)} bytes)"


class _RawHoldingResponse(_Raw, ReadHoldingRegistersResponse):
    """Function code 3 (its RTU frame size comes from pymodbus's class)."""

    function_code = 3


class _RawInputResponse(_Raw, ReadHoldingRegistersResponse):
    """Function code 4."""

    function_code = 4


class _RawCoilsResponse(_Raw, ReadCoilsResponse):
    """Function code 1; bits packed least significant first, unpacked by numpy."""

    function_code = 1


class _RawDiscreteResponse(_Raw, ReadCoilsResponse):
    """Function code 2."""

    function_code = 2


_RESPONSES = (_RawCoilsResponse, _RawDiscreteResponse, _RawHoldingResponse, _RawInputResponse)


class _Garbled(ModbusException):
    """A frame pymodbus could not decode arrived for the request waiting: it fails at once, with this reason."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True, eq=False)  # identity hash: arrays inside
class _Request:
    table: Table
    start: int
    count: int
    cols: npt.NDArray[np.intp]
    buf_offset: int  # registers: where the answer goes in the group's byte buffer
    bit_offsets: npt.NDArray[np.intp] | None  # coils / discrete inputs
    label: str  # in the notation of the device's tags: 40001–40125, or holding:0–124
    spans: tuple[Span[int], ...]  # the tags it reads (item: column), to split it when the device refuses a gap
    modicon: int  # the Modicon digits its label is written with; 0: table:offset

    @staticmethod
    def of(table: Table, r: Read[int], buf_offset: int, modicon: int) -> _Request:
        """The request for one planned read whose answer goes at `buf_offset` of the group's buffer."""
        cols = np.asarray([s.item for s in r.items], dtype=np.intp)
        label = range_text(table, r.start, r.count, modicon)
        if table.is_bits:
            offs = np.asarray([s.start - r.start for s in r.items], dtype=np.intp)
            return _Request(table, r.start, r.count, cols, 0, offs, label, r.items, modicon)
        return _Request(table, r.start, r.count, cols, buf_offset, None, label, r.items, modicon)

    def runs(self) -> tuple[_Request, ...]:
        """Its runs of contiguous tags (the reads max_gap 0 would plan), each writing where it did; () if just one."""
        reads = plan_reads(self.spans, max_count=self.count, max_gap=0)
        if len(reads) < 2:
            return ()
        return tuple(
            _Request.of(self.table, r, self.buf_offset + 2 * (r.start - self.start), self.modicon) for r in reads
        )


@dataclass(frozen=True)
class _GroupPlan:
    requests: tuple[_Request, ...]
    kinds: tuple[str, ...]
    nbytes: int  # register answers of one cycle, back to back
    decoder: BlockDecoder  # decodes every register tag of the group in one pass


class ModbusDriver(DriverBase):
    """Reads a Modbus device: one connection, one request at a time, planned reads."""

    def __init__(self, config: ModbusDevice) -> None:
        super().__init__(config.name)
        self.config = config
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._dropped = False  # the device closed the connection under us (pymodbus only says "not connected")
        self._asking = False  # a request is waiting for its answer
        self._parts = PartFailures(self.name, log)
        self._splits_logged = False
        self._plans: dict[ScanGroup, _GroupPlan] = {}
        self._notation = config.notation()  # requests are named as the device's tags were written
        for interval, tags in group_by_interval(config, config.tags):
            group = ScanGroup(interval, tuple(t.name for t in tags))
            self.groups.append(group)
            self._plans[group] = self._plan(tags)

    @property
    def requests_per_cycle(self) -> dict[float, int]:
        """Requests each scan group sends per cycle."""
        return {g.interval: len(self._plans[g].requests) for g in self.groups}

    def plan(self) -> list[str]:
        """Tags and requests per scan group."""
        return [
            f"{len(g.tags)} tags every {g.interval:g}s in {len(self._plans[g].requests)} requests" for g in self.groups
        ]

    def requests(self) -> dict[ScanGroup, list[Request]]:
        """Each group's requests: what they read (40001–40125, coil:0–15) and the tags they bring."""
        return {
            g: [Request(r.label, tuple(g.tags[c] for c in r.cols)) for r in self._plans[g].requests]
            for g in self.groups
        }

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
                requests.append(_Request.of(table, r, nbytes, self._notation[table]))
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
        for response in _RESPONSES:
            client.register(response)
        self._guard(client.ctx)
        try:
            async with asyncio.timeout(cfg.timeout + 1.0):
                ok = await client.connect()
        except (OSError, TimeoutError, ModbusException) as exc:
            client.close()
            raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: {exc or type(exc).__name__}") from exc
        if not ok:
            client.close()
            why = await self._why_no_connection() if cfg.transport is not Transport.RTU else "the port did not open"
            raise DeviceError(self.name, f"cannot connect to {self._endpoint()}: {why}")
        self._client = client
        self._dropped = False

    async def _why_no_connection(self) -> str:
        """Why a TCP connect failed, in an engineer's terms: pymodbus only says that it did (one probe, bounded)."""
        cfg = self.config
        assert cfg.host is not None
        try:
            async with asyncio.timeout(cfg.timeout):
                _, writer = await asyncio.open_connection(cfg.host, cfg.port)
        except ConnectionRefusedError:
            return f"connection refused (nothing listens on port {cfg.port}: check the port and the device's server)"
        except TimeoutError:
            return f"no answer within {cfg.timeout:g}s (check the address, the network path and firewalls)"
        except OSError as exc:
            return exc.strerror or str(exc)
        writer.close()
        return "the connection closed at once (the device may allow fewer clients, or refuse this address)"

    def _guard(self, ctx: TransactionManager) -> None:
        """Catch what pymodbus raises for a frame it cannot decode, before asyncio logs it with a traceback.

        Raised from `data_received`, it reaches asyncio's exception handler ("Fatal error: protocol.
        data_received() call failed", pymodbus's traceback at ERROR, once per frame) and the request waits
        out its timeout. Caught here, it fails the waiting request at once, and the poller logs one line;
        the frame and the traceback go to DEBUG. Anything else asyncio reports stays visible.
        """
        handle = ctx.callback_data

        def callback_data(data: bytes, addr: tuple[Any, ...] | None = None) -> int:
            try:
                return handle(data, addr)
            except (ModbusException, ValueError, IndexError, struct.error):
                shown = data[:16].hex(" ") + (" …" if len(data) > 16 else "")
                why = f"an answer that does not decode ({len(data)} bytes: {shown})"
                log.debug("device %s: %s", self.name, why, exc_info=True)
                if self._asking and not ctx.response_future.done():
                    ctx.response_future.set_exception(_Garbled(why))
                return len(data)  # dropped: the next request starts on an empty buffer anyway

        ctx.callback_data = callback_data  # type: ignore[method-assign]

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
            self._asking = True
            try:
                rr = await calls[req.table](req.start, count=req.count, device_id=unit)
            except (ModbusException, OSError, TimeoutError) as exc:
                raise DeviceError(self.name, f"{req.label}: {self._no_answer(exc)}") from exc
            finally:
                self._asking = False
            wrong = self._mismatch(req, rr, client.ctx.request_transaction_id)
            if wrong is not None:
                failures.append(PartFailure(req.label, [group.tags[c] for c in req.cols], wrong))
                failed.append(req)
                continue
            if rr.isError():
                code = getattr(rr, "exception_code", None)
                runs = req.runs() if code == ILLEGAL_ADDRESS else ()
                if runs:
                    # the gap it bridged is unmapped on this device: read the tags' own runs, now and from now on
                    pending[i:i] = runs
                    splits.append((req, runs))
                    continue
                failures.append(self._failure(req, group, f"answered {exception_text(code)}", code))
                failed.append(req)
                continue
            assert isinstance(rr, _Raw)  # a read's function code decodes to one of ours (connect registers them)
            payload = np.frombuffer(rr.raw, np.uint8)  # its length checked against the request by _mismatch
            if req.bit_offsets is not None:
                values[req.cols] = np.unpackbits(payload, bitorder="little")[req.bit_offsets]
            else:
                block[req.buf_offset : req.buf_offset + 2 * req.count] = payload
            answered.append(req.label)
        if splits:
            self._replace_split(group, splits)
        self._parts.scan(f"the {group.interval:g}s scan", failures, answered)
        plan.decoder.decode(block, values, quality, exact)
        for req in failed:
            mark_bad(values, quality, exact, req.cols)
        return SampleBatch(self.name, ts, group.tags, values, quality, exact, plan.kinds)

    def _mismatch(self, req: _Request, rr: ModbusPDU, tid: int) -> str | None:
        """What makes `rr` no answer to `req` (sent as transaction `tid`), in words; None when it is one.

        An exception answer to the request's function code is an answer (the caller handles it). Raises
        DeviceError for a frame that contradicts itself: which of its lengths lies is unknown, so nothing
        after it on the connection can be trusted either.
        """
        # pymodbus skips an answer to another transaction id, but takes 0 for any (RTU frames have none)
        if self.config.transport is Transport.TCP and rr.transaction_id != tid:
            return f"answered transaction id {rr.transaction_id} to transaction {tid}"
        want, got = _FUNCTION[req.table], rr.function_code & 0x7F
        if got != want:
            name = _FUNCTION_NAMES.get(got)
            what = f"an exception for function code {got}" if rr.isError() else f"function code {got}"
            what += f" ({name})" if name and not rr.isError() else ""
            return f"answered {what} to function code {want} ({_FUNCTION_NAMES[want]})"
        if rr.isError():
            return None
        assert isinstance(rr, _Raw)  # a read's function code decodes to one of ours (connect registers them)
        n, have = rr.byte_count, len(rr.raw)
        if n < 0:
            raise DeviceError(self.name, f"{req.label}: a corrupt answer: it has no byte count")
        if n != have:
            follow = "follows" if have == 1 else "follow"
            raise DeviceError(self.name, f"{req.label}: a corrupt answer: its byte count says {n} but {have} {follow}")
        need = (req.count + 7) // 8 if req.table.is_bits else 2 * req.count
        if n != need:
            unit = _UNITS[req.table] + ("s" if req.count != 1 else "")
            return f"answered {n} bytes to a read of {req.count} {unit} ({need} byte{'s' if need != 1 else ''})"
        return None

    def _no_answer(self, exc: BaseException) -> str:
        """Why a request got no answer, in words: pymodbus's own text names its retries, not the cause."""
        if isinstance(exc, _Garbled):
            return exc.why
        if isinstance(exc, ModbusIOException) and "No response" in str(exc):
            text = f"no answer within {self.config.timeout:g}s"
        else:
            text = str(exc) or type(exc).__name__
        return text + ("; the device closed the connection" if self._dropped else "")

    def _failure(self, req: _Request, group: ScanGroup, why: str, code: int | None = None) -> PartFailure:
        hint = " (if the device leaves gaps unmapped, lower planner.max_gap)" if req.runs() else ""
        if code in _WRONG_UNIT_CODES:
            # gateways, and many PLCs, answer these for a unit id that is not there: the commonest cause
            unit = self.config.unit
            hint = f" (if the device is on, check its unit id, now {unit}: a unit that is not there is answered so)"
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
        """Requests that failed on their own (exception answers, answers that do not match their request)."""
        return self._parts.count
