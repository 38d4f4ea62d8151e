"""The simulator served over Modbus TCP, read by a plain pymodbus client and decoded by hand."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from helpers import free_port, wait_for
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.simulate import SimulatorOptions, parse_fault_spec, run_simulator

pytestmark = pytest.mark.asyncio

# The register map contract, written out independently of the server code.
SIGNALS = (
    "suction_pressure",
    "discharge_pressure",
    "flow",
    "motor_current",
    "vibration_rms",
    "bearing_temp",
    "fluid_temp",
    "valve_position",
)
SCALES = (100, 100, 10, 10, 100, 10, 10, 10)
PLAUSIBLE = {
    "suction_pressure": (1.0, 2.0),
    "discharge_pressure": (5.0, 7.0),
    "flow": (34.0, 46.0),
    "motor_current": (25.0, 35.0),
    "vibration_rms": (1.5, 4.0),
    "bearing_temp": (45.0, 65.0),
    "fluid_temp": (18.0, 32.0),
    "valve_position": (98.0, 102.0),
}
# The two copies may come from adjacent ticks: allow a few noise sigmas plus the int16 step.
TOLERANCE = {
    "suction_pressure": 0.1,
    "discharge_pressure": 0.2,
    "flow": 2.0,
    "motor_current": 1.0,
    "vibration_rms": 0.6,
    "bearing_temp": 0.7,
    "fluid_temp": 0.4,
    "valve_position": 1.5,
}
ILLEGAL_ADDRESS, GATEWAY_NO_RESPONSE = 2, 11


@dataclass
class Sim:
    port: int
    ready: list[str]
    client: AsyncModbusTcpClient
    task: asyncio.Task[None]


async def start(options: SimulatorOptions) -> tuple[asyncio.Task[None], list[str]]:
    ready: list[str] = []
    task = asyncio.create_task(run_simulator(options, on_ready=ready.extend), name="simulator")
    async with asyncio.timeout(3):
        while not ready:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
    return task, ready


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 3)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Sim]:
    port = free_port()
    task, ready = await start(SimulatorOptions(ports={"modbus": port}, seed=11))
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    assert await client.connect()
    try:
        yield Sim(port, ready, client, task)
    finally:
        client.close()
        await stop(task)


async def read_floats(c: AsyncModbusTcpClient) -> dict[str, float]:
    rr = await c.read_holding_registers(0, count=16, device_id=1)
    assert not rr.isError(), rr
    return dict(zip(SIGNALS, struct.unpack(">8f", struct.pack(">16H", *rr.registers)), strict=True))


async def read_scaled(c: AsyncModbusTcpClient) -> dict[str, float]:
    rr = await c.read_input_registers(0, count=8, device_id=1)
    assert not rr.isError(), rr
    raw = struct.unpack(">8h", struct.pack(">8H", *rr.registers))
    return {s: r / k for s, r, k in zip(SIGNALS, raw, SCALES, strict=True)}


async def read_run_seconds(c: AsyncModbusTcpClient) -> int:
    rr = await c.read_input_registers(100, count=2, device_id=1)
    assert not rr.isError(), rr
    low, high = rr.registers  # CDAB: low word first
    return int(struct.unpack(">I", struct.pack(">HH", high, low))[0])


async def test_ready_line_names_the_endpoint(sim: Sim) -> None:
    assert sim.ready == [f"modbus tcp 127.0.0.1:{sim.port} unit 1"]


async def test_every_mapped_address_decodes_plausibly(sim: Sim) -> None:
    c = sim.client
    floats, scaled = await read_floats(c), await read_scaled(c)
    for s in SIGNALS:
        lo, hi = PLAUSIBLE[s]
        assert lo < floats[s] < hi, (s, floats[s])
        assert abs(floats[s] - scaled[s]) < TOLERANCE[s], (s, floats[s], scaled[s])
    # Single registers of a float can be read alone, and agree with the block read's layout.
    one = await c.read_holding_registers(4, count=2, device_id=1)
    assert 34 < struct.unpack(">f", struct.pack(">2H", *one.registers))[0] < 46

    rr = await c.read_holding_registers(100, count=8, device_id=1)
    assert struct.pack(">8H", *rr.registers) == b"EA-PUMP-SKID-01\x00"

    coils = await c.read_coils(0, count=2, device_id=1)
    assert coils.bits[:2] == [True, False]
    di = await c.read_discrete_inputs(0, count=3, device_id=1)
    assert di.bits[:3] == [True, False, False]  # running, no fault, vibration normal


async def test_run_seconds_counts_up(sim: Sim) -> None:
    first = await read_run_seconds(sim.client)
    assert 7_654_321 <= first < 7_654_321 + 60  # high word non-zero: catches a word swap

    async def ticked() -> bool:
        return await read_run_seconds(sim.client) != first

    await wait_for(ticked, timeout=3, step=0.05, what="run_seconds increases")
    assert await read_run_seconds(sim.client) == first + 1


async def test_coil_write_stops_and_restarts_the_pump(sim: Sim) -> None:
    c = sim.client
    wr = await c.write_coil(0, False, device_id=1)
    assert not wr.isError(), wr
    assert (await c.read_coils(0, count=1, device_id=1)).bits[0] is False

    async def stopped() -> bool:
        floats, scaled = await read_floats(c), await read_scaled(c)
        return (
            floats["flow"] == 0
            and scaled["flow"] == 0
            and floats["motor_current"] == 0
            and scaled["motor_current"] == 0
        )

    await wait_for(stopped, timeout=4, step=0.05, what="flow and current reach 0")
    assert (await c.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is False

    assert not (await c.write_coil(0, True, device_id=1)).isError()

    async def flowing() -> bool:
        return (await read_floats(c))["flow"] > 10

    await wait_for(flowing, timeout=4, step=0.05, what="flow returns")
    assert (await c.read_discrete_inputs(0, count=1, device_id=1)).bits[0] is True


async def test_unmapped_addresses_and_other_units_are_refused(sim: Sim) -> None:
    c = sim.client
    refused = [
        c.read_holding_registers(16, count=1, device_id=1),  # 40017: after the floats
        c.read_holding_registers(14, count=4, device_id=1),  # runs past 40016
        c.read_holding_registers(99, count=1, device_id=1),  # 40100
        c.read_holding_registers(108, count=1, device_id=1),  # 40109
        c.read_input_registers(8, count=1, device_id=1),  # 30009
        c.read_input_registers(102, count=1, device_id=1),  # 30103
        c.read_coils(2, count=1, device_id=1),  # 00003
        c.read_coils(0, count=3, device_id=1),
        c.read_discrete_inputs(3, count=1, device_id=1),  # 10004
        c.write_coil(5, True, device_id=1),
        c.write_register(0, 1234, device_id=1),  # measurements are read-only
    ]
    for request in refused:
        rr = await request
        assert rr.isError() and rr.exception_code == ILLEGAL_ADDRESS, rr
    other = await c.read_holding_registers(0, count=2, device_id=2)
    assert other.isError() and other.exception_code == GATEWAY_NO_RESPONSE, other
    assert not (await c.read_holding_registers(0, count=2, device_id=1)).isError()


async def test_faults_show_on_the_wire_and_reset_clears_them() -> None:
    port = free_port()
    options = SimulatorOptions(ports={"modbus": port}, seed=3, tick=0.05, faults=(parse_fault_spec("sensor_stuck@0"),))
    task, _ = await start(options)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    try:
        assert await client.connect()
        di = await client.read_discrete_inputs(0, count=3, device_id=1)
        assert di.bits[1] is True  # fault_active
        assert not (await client.write_coil(1, True, device_id=1)).isError()  # fault_reset

        async def cleared() -> bool:
            return not (await client.read_discrete_inputs(0, count=3, device_id=1)).bits[1]

        await wait_for(cleared, timeout=2, step=0.05, what="fault_active clears")
        assert (await client.read_coils(0, count=2, device_id=1)).bits[:2] == [True, False]
    finally:
        client.close()
        await stop(task)


async def test_cancel_shuts_down_cleanly_with_a_client_connected(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING)
    task, _ = await start(SimulatorOptions(ports={"modbus": port}))
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    assert await client.connect()
    assert not (await client.read_coils(0, count=1, device_id=1)).isError()
    await stop(task)
    client.close()
    await asyncio.sleep(0.05)
    # The port is free again, and nothing complained (e.g. "Task was destroyed").
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_port_in_use_raises_oserror() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=str(port)):
            await asyncio.wait_for(run_simulator(SimulatorOptions(ports={"modbus": port})), 3)
