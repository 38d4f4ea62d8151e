"""Hostile Modbus answers: every answer must match its request, or its request's tags are bad.

Against `hostile.HostileModbus`, through the real driver, poller, agent and `edge-agent read`.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from hostile import HostileModbus

from edge_agent.config import parse_config
from edge_agent.drivers.modbus.config import ModbusDevice
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.types import Quality

pytestmark = pytest.mark.integration

TEMP, LIE = 21.5, 999.0  # the holding registers hold TEMP; the input registers at the same address hold LIE


def config(port: int, timeout: str = "300ms") -> str:
    """One device: a float32 in holding registers 0-1 (request `holding 0..1`) and a coil (request `coil 0..0`)."""
    return (
        f"devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n    port: {port}\n"
        f"    poll_interval: 50ms\n    timeout: {timeout}\n    backoff: {{initial: 50ms, max: 200ms}}\n"
        "    tags:\n"
        '      - {name: temp, address: "40001", type: float32}\n'
        '      - {name: run, address: "00001"}\n'
    )


def fill(server: HostileModbus) -> None:
    server.place("holding", 0, list(struct.unpack(">HH", struct.pack(">f", TEMP))))
    server.place("input", 0, list(struct.unpack(">HH", struct.pack(">f", LIE))))
    server.coils[0] = True


def device(port: int) -> ModbusDevice:
    dev = parse_config(config(port)).devices[0]
    assert isinstance(dev, ModbusDevice)
    return dev


async def read_once(server: HostileModbus) -> dict[str, tuple[float, Quality]]:
    """One scan through a fresh driver: tag -> (value, quality); DeviceError when the read fails as a whole."""
    driver = ModbusDriver(device(server.port))
    await driver.connect()
    try:
        batch = await asyncio.wait_for(driver.read(driver.groups[0]), 5)
    finally:
        await driver.close()
    return {tag: (float(batch.values[i]), Quality(batch.quality[i])) for i, tag in enumerate(batch.tags)}


async def test_honest_answers_read_good(hostile: HostileModbus) -> None:
    # the server itself: honest, it serves what the tables hold (so the lies below are the only difference)
    fill(hostile)
    assert await read_once(hostile) == {"temp": (TEMP, Quality.GOOD), "run": (1.0, Quality.GOOD)}
    assert [(r.function, r.start, r.count) for r in hostile.requests] == [(3, 0, 2), (1, 0, 1)]
