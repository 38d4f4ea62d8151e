"""A hostile Modbus TCP server: raw asyncio, answering each request honestly or with the lie a test chose.

Real devices and gateways answer with the wrong transaction id, truncated or oversized frames, byte counts
that lie, another function code, late or never, or reset the connection mid-frame. pymodbus's own server
never does, so the driver's checks of each answer are tested against this one. It serves function codes
1-4 (anything else: exception 1) for one unit from four tables the test owns, like `peers.ModbusPeer`.

    server = HostileModbus()
    await server.start()
    server.lie(3, Lie(function=4))            # every holding-register read answered as input registers
    server.lie(1, Lie(byte_count=9), times=1)  # the next coil read only
    server.lie(3, None)                        # honest again

Every behaviour is bounded: a delay is at most `MAX_DELAY`, a silent or truncated answer holds the
connection only until the client or `stop()` closes it, and each connection serves one request at a time.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

MAX_DELAY = 10.0  # seconds: a slow answer never holds a test longer than this
_TABLES = {1: "coils", 2: "discrete", 3: "holding", 4: "input"}


@dataclass(frozen=True)
class Lie:
    """How to answer one request. Left at its defaults, a field answers honestly; each one set bends one thing.

    The frame is built as: `delay`, then the answer for function code `function` over the request's range
    (or `count` of it), with `byte_count` in its byte count field and `pad` zero bytes after its data, in an
    MBAP header carrying `tid` and the length of what follows; `pdu` replaces everything after the unit id,
    `garbage` the whole frame. Then `cut` keeps only the frame's first bytes, `reset` ends the connection
    with a TCP reset after sending, and `silent` sends nothing at all.
    """

    function: int | None = None  # answer with this function code, carrying that table's data for the same range
    tid: int | None = None  # this transaction id instead of the request's
    byte_count: int | None = None  # this byte count; the data stays what the request asked for
    count: int | None = None  # this many registers or bits, in a frame that is consistent with itself
    pad: int = 0  # zero bytes after the data, counted by the MBAP length (over 253 the frame exceeds Modbus's 260)
    pdu: bytes | None = None  # these bytes after the unit id, in a correct MBAP header
    garbage: bytes | None = None  # these bytes instead of a frame
    cut: int | None = None  # send only the first `cut` bytes of the frame, then hold the connection
    reset: bool = False  # after sending, reset the connection (RST, not FIN)
    delay: float = 0.0  # seconds before answering
    silent: bool = False  # read the request, never answer it

    def __post_init__(self) -> None:
        assert 0.0 <= self.delay <= MAX_DELAY, f"delay {self.delay} outside 0..{MAX_DELAY}"
        assert 0 <= self.pad <= 1000 and (self.cut is None or self.cut >= 0)
        assert self.byte_count is None or 0 <= self.byte_count <= 255
        assert self.count is None or 0 <= self.count <= 2000


@dataclass(frozen=True)
class Request:
    """A request the server read: its transaction id, unit, function code, start and count."""

    tid: int
    unit: int
    function: int
    start: int
    count: int


class HostileModbus:
    """A Modbus TCP server on a free 127.0.0.1 port whose answers a test bends per function code."""

    def __init__(self, *, size: int = 256, unit: int = 1) -> None:
        self.size = size
        self.unit = unit
        self.holding = [0] * size
        self.input = [0] * size
        self.coils = [False] * size
        self.discrete = [False] * size
        self.requests: list[Request] = []  # every request read, in order
        self.connections = 0  # accepted so far
        self.port = 0
        self._lies: dict[int, tuple[Lie, int | None]] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def lie(self, function: int, lie: Lie | None, times: int | None = None) -> None:
        """Answer requests of `function` with `lie`: the next `times` of them, or until changed; None: honestly."""
        if lie is None:
            self._lies.pop(function, None)
        else:
            assert times is None or times > 0
            self._lies[function] = (lie, times)

    def place(self, table: str, address: int, registers: list[int]) -> None:
        """Put register values at a 0-based address of `holding` or `input`."""
        getattr(self, table)[address : address + len(registers)] = registers

    async def start(self) -> int:
        """Listen on a free 127.0.0.1 port; return it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Close the listener and every connection; end every handler (a silent one included)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _next_lie(self, function: int) -> Lie:
        lie, times = self._lies.get(function, (Lie(), None))
        if times is not None:
            if times == 1:
                del self._lies[function]
            else:
                self._lies[function] = (lie, times - 1)
        return lie

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            # one request at a time, until the client hangs up, a lie resets the connection, or stop()
            while await self._answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # stop(): ending normally keeps asyncio's stream callback from logging the cancellation
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; False when the connection is to end."""
        tid, proto, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
        if proto != 0 or not 2 <= length <= 254:
            return False  # not Modbus TCP: hang up
        pdu = await reader.readexactly(length - 1)
        function = pdu[0]
        start, count = struct.unpack(">HH", pdu[1:5]) if len(pdu) >= 5 else (0, 0)
        self.requests.append(Request(tid, unit, function, start, count))
        if function not in _TABLES or len(pdu) != 5:
            writer.write(_frame(tid, unit, bytes([function | 0x80, 1])))  # illegal function
            await writer.drain()
            return True
        lie = self._next_lie(function)
        if lie.delay:
            await asyncio.sleep(lie.delay)
        if lie.silent:
            return True
        frame = self._frame(lie, tid, unit, function, start, count)
        writer.write(frame if lie.cut is None else frame[: lie.cut])
        await writer.drain()
        if lie.reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
            writer.transport.abort()
            return False
        return True

    def _frame(self, lie: Lie, tid: int, unit: int, function: int, start: int, count: int) -> bytes:
        if lie.garbage is not None:
            return lie.garbage
        tid = tid if lie.tid is None else lie.tid
        if lie.pdu is not None:
            return _frame(tid, unit, lie.pdu)
        answer_fc = function if lie.function is None else lie.function
        n = count if lie.count is None else lie.count
        if start + n > self.size:
            return _frame(tid, unit, bytes([function | 0x80, 2]))  # illegal data address
        data = self._data(answer_fc, start, n)
        byte_count = len(data) if lie.byte_count is None else lie.byte_count
        return _frame(tid, unit, bytes([answer_fc, byte_count & 0xFF]) + data + bytes(lie.pad))

    def _data(self, function: int, start: int, count: int) -> bytes:
        """The honest data of a read: big-endian registers, or bits packed least significant first."""
        table = getattr(self, _TABLES[function])
        if function in (3, 4):
            return b"".join(struct.pack(">H", v & 0xFFFF) for v in table[start : start + count])
        out = bytearray((count + 7) // 8)
        for i, bit in enumerate(table[start : start + count]):
            if bit:
                out[i // 8] |= 1 << (i % 8)
        return bytes(out)


def _frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """An MBAP header (protocol 0, length of unit id + pdu) and the pdu."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu
