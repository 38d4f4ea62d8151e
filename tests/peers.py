"""Real protocol peers for tests: a pymodbus server with hand-placed registers on a free loopback port."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.agent import Agent
from edge_agent.types import Quality

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

_TABLE_OF_FC = {
    1: "coils",
    5: "coils",
    15: "coils",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    4: "input",
}


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _blocks(size: int, holes: Iterable[tuple[int, int]], bits: bool) -> list[SimData]:
    """Valid cells 0..size-1 except the [start, end) holes, which answer ILLEGAL ADDRESS."""
    holes = sorted(holes)
    out, pos = [], 0
    for start, end in [*holes, (size, size)]:
        if start > pos:
            if bits:
                out.append(SimData(pos, values=[False] * (start - pos), datatype=DataType.BITS))
            else:
                out.append(SimData(pos, count=start - pos, values=0, datatype=DataType.REGISTERS))
        if end > start and start < size:
            out.append(SimData(start, count=end - start, datatype=DataType.INVALID))
        pos = max(pos, end)
    return out


class ModbusPeer:
    """A pymodbus TCP server whose tables the test owns: change `holding[i]` and the next read sees it.

    `holes` are [start, end) register ranges that answer ILLEGAL ADDRESS, as unmapped areas do.
    """

    def __init__(
        self, *, size: int = 1024, unit: int = 1, holes: Iterable[tuple[int, int]] = (), framer: str = "socket"
    ) -> None:
        self.framer = FramerType(framer)
        self.size = size
        self.unit = unit
        self.holes = list(holes)
        self.holding = [0] * size
        self.input = [0] * size
        self.coils = [False] * size
        self.discrete = [False] * size
        self.requests = 0
        self.refuse: ExcCodes | None = None  # answer every request with this exception (a gateway's dead device)
        self.port = 0
        self._server: ModbusTcpServer | None = None

    def place(self, table: str, address: int, registers: Iterable[int]) -> None:
        """Put register values at a 0-based address of `holding` or `input`."""
        target = getattr(self, table)
        for i, r in enumerate(registers):
            target[address + i] = r

    async def _action(
        self,
        fc: int,
        start: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self.requests += 1
        if self.refuse is not None:
            return self.refuse
        table = _TABLE_OF_FC.get(fc)
        if table in ("holding", "input"):
            src = getattr(self, table)
            if set_values:
                for i, v in enumerate(set_values):
                    src[address + i] = int(v)
            off = address - start
            current[off : off + count] = src[address : address + count]
        elif table in ("coils", "discrete"):
            src = getattr(self, table)
            if set_values:
                for i, v in enumerate(set_values):
                    src[address + i] = bool(v)
            # bit blocks hold 16 coils per register, least significant bit first
            for reg in range(len(current)):
                word = 0
                for b in range(16):
                    idx = reg * 16 + b
                    if idx < self.size and src[idx]:
                        word |= 1 << b
                current[reg] = word
        return None

    async def start(self, port: int | None = None) -> int:
        """Listen on 127.0.0.1 (same port as before after a stop, unless given)."""
        self.port = port or self.port or free_port()
        device = SimDevice(
            self.unit,
            simdata=(
                _blocks(self.size, (), True),
                _blocks(self.size, (), True),
                _blocks(self.size, self.holes, False),
                _blocks(self.size, self.holes, False),
            ),
            action=self._action,
        )
        self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port), framer=self.framer)
        await self._server.serve_forever(background=True)
        await asyncio.sleep(0.05)
        return self.port

    async def stop(self) -> None:
        """Close the listener and every client connection."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> None:
    """Poll `pred` until it holds; fail the test after `timeout` seconds (bounded, like every test loop)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(step)


def latest_value(agent: Agent, tag: str) -> tuple[float, Quality] | None:
    """A tag's newest (value, quality) in the agent's buffers, or None before its first sample."""
    latest = agent.latest(tag)
    return None if latest is None else (latest[1], latest[2])
