"""Modbus RTU on a serial line, end to end: the agent and a pymodbus serial server joined by two pseudo-terminals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import sys
import tty
from collections.abc import AsyncIterator

import pytest
from helpers import latest_value as value
from helpers import wait_for
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.types import Quality

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


class SerialLine:
    """Two pseudo-terminals whose master sides are relayed to each other: a null-modem cable with two ends.

    One pty alone will not do: its master side has no device path for a serial port to open.
    """

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.masters: list[int] = []
        self.paths: list[str] = []

    def open(self) -> None:
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo or line editing: the bytes of a frame pass as they are
            os.set_blocking(master, False)
            self.fds += [master, slave]  # the slave stays open here, or the master reads EIO between opens
            self.masters.append(master)
            self.paths.append(os.ttyname(slave))
        loop = asyncio.get_running_loop()
        a, b = self.masters
        loop.add_reader(a, self._relay, a, b)
        loop.add_reader(b, self._relay, b, a)

    @staticmethod
    def _relay(src: int, dst: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(dst, os.read(src, 4096))

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self.masters:
            loop.remove_reader(fd)
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
async def line() -> AsyncIterator[SerialLine]:
    """A serial line; the server takes paths[0], the agent paths[1]."""
    cable = SerialLine()
    cable.open()
    try:
        yield cable
    finally:
        cable.close()


async def test_rtu_over_a_serial_line(line: SerialLine) -> None:
    hi, lo = struct.unpack(">HH", struct.pack(">f", 12.25))
    registers = [0] * 16
    registers[0:2] = [lo, hi]  # CDAB: low word first
    registers[2] = 777
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    device = SimDevice(
        7, simdata=(bits, bits, [SimData(0, values=registers, datatype=DataType.REGISTERS)], [SimData(0, count=16)])
    )
    server = ModbusSerialServer(device, port=line.paths[0], framer=FramerType.RTU, baudrate=19200, parity="N")
    await server.serve_forever(background=True)
    text = (
        "devices:\n  - name: rtu\n    type: modbus\n    transport: rtu\n"
        # a pty refuses parity settings (tcsetattr: EINVAL), so this line runs 8N1
        f"    serial: {{port: {line.paths[1]}, baudrate: 19200, parity: N}}\n"
        "    unit: 7\n    byte_order: CDAB\n    poll_interval: 100ms\n    timeout: 500ms\n    tags:\n"
        '      - {name: rtu.v, address: "40001", type: float32}\n'
        '      - {name: rtu.n, address: "40003"}\n'
    )
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "rtu.v") == (12.25, Quality.GOOD))
        assert value(agent, "rtu.n") == (777.0, Quality.GOOD)
        assert agent.stats().devices[0].connected and agent.stats().devices[0].failures == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await server.shutdown()
