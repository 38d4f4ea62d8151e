"""The simulator's S7 server, read through examples/simulator-s7.yaml; expected bytes come from the plant by hand."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import load_config, parse_config
from edge_agent.drivers.s7.driver import S7Driver
from edge_agent.simulate.plant import SIGNALS, Plant
from edge_agent.simulate.s7_server import S7PlantServer
from edge_agent.types import Quality

EXAMPLES = Path(__file__).parents[3] / "examples"


def f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


@pytest.fixture
async def served() -> AsyncIterator[tuple[Plant, S7PlantServer]]:
    plant = Plant(seed=3, dt=0.1)
    plant.advance(5)
    server = S7PlantServer(plant, port=0, refresh=0.01)
    await server.start()
    try:
        yield plant, server
    finally:
        await server.stop()


async def read_example(port: int) -> dict[str, tuple[object, Quality]]:
    cfg = load_config(EXAMPLES / "simulator-s7.yaml", environ={"SIM_S7_PORT": str(port)})
    driver = S7Driver(cfg.devices[0])
    await driver.connect()
    try:
        out = {}
        for group in driver.groups:
            out.update({s.tag: (s.value, s.quality) for s in (await driver.read(group)).samples()})
        return out
    finally:
        await driver.close()


async def test_example_reads_every_signal(served: tuple[Plant, S7PlantServer]) -> None:
    plant, server = served
    assert server.endpoint == f"s7 127.0.0.1:{server.port} rack 0 slot 1 DB1"
    st = plant.state
    values = await read_example(server.port)
    assert all(q is Quality.GOOD for _, q in values.values()), values
    got = {k: v for k, (v, _) in values.items()}
    for name in SIGNALS:
        assert got[f"pump.{name}"] == f32(getattr(st, name)), name
    assert got["pump.motor_running"] is st.motor_running is True
    assert got["pump.run_command"] is True and got["pump.run_output"] is True and got["pump.contactor_closed"] is True
    assert got["pump.fault_active"] is False and got["pump.high_vibration"] is False
    assert got["pump.run_seconds"] == st.run_seconds
    assert got["pump.vibration_rms_raw"] == pytest.approx(round(st.vibration_rms * 100) * 0.01)
    assert got["pump.model"] == "EA-PUMP-SKID-01"
    assert got["pump.heartbeat"] == st.tick


async def test_marker_area_and_refresh(served: tuple[Plant, S7PlantServer]) -> None:
    plant, server = served
    text = (
        f"devices:\n  - name: sim\n    type: s7\n    host: 127.0.0.1\n    port: {server.port}\n    tags:\n"
        "      - {name: flow, address: MD2, type: real}\n"
        "      - {name: running, address: M6.0}\n"
        "      - {name: fault, address: M6.1}\n"
        "      - {name: run, address: DB1.DBX32.3}\n"
        "      - {name: other_db, address: DB2.DBW0, type: int}\n"
    )
    driver = S7Driver(parse_config(text).devices[0])
    await driver.connect()
    try:
        first = {s.tag: (s.value, s.quality) for s in (await driver.read(driver.groups[0])).samples()}
        assert first["flow"] == (f32(plant.state.flow), Quality.GOOD)
        assert first["running"] == (True, Quality.GOOD) and first["fault"] == (False, Quality.GOOD)
        assert first["other_db"] == (None, Quality.BAD)  # the simulator serves DB1 only
        plant.pump_run = False
        plant.advance(30)  # 3 s: the motor is off and the pump has coasted down
        await asyncio.sleep(0.05)  # a few refresh periods
        later = {s.tag: s.value for s in (await driver.read(driver.groups[0])).samples()}
    finally:
        await driver.close()
    assert later["run"] is False and later["running"] is False
    assert later["flow"] == f32(plant.state.flow) == 0.0


def test_example_passes_check_and_shares_tag_names_with_modbus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLES / "simulator-s7.yaml")]) == 0
    assert "pump-skid (s7)" in capsys.readouterr().out
    s7 = {t.name for t in load_config(EXAMPLES / "simulator-s7.yaml").devices[0].tags}
    modbus = {t.name for t in load_config(EXAMPLES / "simulator-modbus.yaml").devices[0].tags}
    shared = {f"pump.{s}" for s in SIGNALS} | {"pump.run_seconds", "pump.model", "pump.motor_running"}
    assert shared <= s7 & modbus
