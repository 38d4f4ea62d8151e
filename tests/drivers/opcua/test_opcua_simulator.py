"""The simulator's OPC UA server, read through examples/simulator-opcua.yaml, plainly and encrypted."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Client, ua
from helpers import free_port, wait_for
from opcua_peer import Pki, edge_agent

from edge_agent.agent import Agent
from edge_agent.config import load_config, parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.simulate.opcua_server import NAMESPACE_URI, OpcUaPlantServer, node_name
from edge_agent.simulate.plant import SIGNALS, UNITS, Plant
from edge_agent.types import Quality

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLE = Path(__file__).parents[3] / "examples" / "simulator-opcua.yaml"
PLAUSIBLE = {
    "pump.suction_pressure": (1.0, 2.0),
    "pump.discharge_pressure": (5.0, 7.0),
    "pump.flow": (34.0, 46.0),
    "pump.motor_current": (25.0, 35.0),
    "pump.vibration_rms": (1.5, 4.0),
    "pump.bearing_temp": (45.0, 65.0),
    "pump.fluid_temp": (18.0, 32.0),
    "pump.valve_position": (98.0, 102.0),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def simulator(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[OpcUaPlantServer, Plant]]:
    """The plant served over OPC UA, stepped every 50 ms."""
    plant = Plant(seed=3, dt=0.05)
    server = OpcUaPlantServer(plant, port=free_port(), cert_dir=tmp_path_factory.mktemp("sim-pki"))
    await server.start()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.05)
            plant.advance(1)

    ticker = asyncio.create_task(tick())
    try:
        yield server, plant
    finally:
        ticker.cancel()
        await server.stop()


async def test_the_example_reads_the_simulator(simulator: tuple[OpcUaPlantServer, Plant]) -> None:
    server, plant = simulator
    assert (
        server.endpoint
        == f"opcua opc.tcp://127.0.0.1:{server.port}/edge-agent/simulator (None, Basic256Sha256 Sign/SignAndEncrypt)"
    )
    cfg = load_config(EXAMPLE, environ={"SIM_OPCUA_PORT": str(server.port)})
    agent = Agent(cfg.model_copy(update={"models": []}))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    def value(tag: str) -> object:
        got = agent.latest(tag)
        return got[1] if got is not None and got[2] is Quality.GOOD else None

    try:
        await wait_for(
            lambda: all(value(t) is not None for t in [*PLAUSIBLE, "pump.run_seconds", "pump.motor_running"])
        )
        for tag, (low, high) in PLAUSIBLE.items():
            assert low <= value(tag) <= high, tag  # type: ignore[operator]
        assert value("pump.motor_running") == 1.0 and value("pump.run_seconds") >= 7_654_321  # type: ignore[operator]
        # writing PumpRun False stops the pump, as the Modbus coil does
        async with Client(server.url) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            await client.get_node(ua.NodeId("PumpSkid.PumpRun", idx)).write_value(
                ua.Variant(False, ua.VariantType.Boolean)
            )
        await wait_for(lambda: value("pump.motor_running") == 0.0, timeout=5)
        assert plant.pump_run is False
    finally:
        plant.pump_run = True
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_browse_of_the_simulator_passes_check_and_read(
    simulator: tuple[OpcUaPlantServer, Plant], tmp_path: Path
) -> None:
    server, _ = simulator
    out = tmp_path / "skid.yaml"
    code, _, err = await edge_agent("browse", server.url, "--name", "skid", "--out", str(out))
    assert code == 0, err
    tags = {t.name: t for t in load_config(out).devices[0].tags}  # type: ignore[attr-defined]
    # every variable of the address space contract, by namespace URI, with the unit its EUInformation gives
    want = [node_name(s) for s in SIGNALS] + ["MotorRunning", "FaultActive", "HighVibration", "PumpRun", "RunSeconds"]
    want += ["SampleTime", "Model", "FaultReset"]
    assert sorted(tags) == sorted(f"PumpSkid.{n}" for n in want)
    assert all(str(t.node) == f"nsu={NAMESPACE_URI};s={name}" for name, t in tags.items())
    assert {n: t.unit for n, t in tags.items() if t.unit} == {f"PumpSkid.{node_name(s)}": UNITS[s] for s in SIGNALS}
    code, _, err = await edge_agent("check", str(out))
    assert code == 0, err
    code, text, err = await edge_agent("read", str(out), "--json")
    assert code == 0, text + err
    assert [r["quality"] for r in map(json.loads, text.splitlines())] == ["good"] * len(want)


async def test_the_simulator_signs_and_encrypts(
    simulator: tuple[OpcUaPlantServer, Plant], pki: Pki, tmp_path: Path
) -> None:
    server, _ = simulator
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(server.certificate_path, trust)
    text = (
        "devices:\n  - name: sim\n    type: opcua\n"
        f"    endpoint: {server.url}\n"
        f"    security: {{policy: Basic256Sha256, mode: SignAndEncrypt, certificate: {pki.client_cert}, "
        f"private_key: {pki.client_key}, trust_dir: {trust}}}\n"
        "    tags:\n"
        '      - {name: model, node: "nsu=urn:edge-agent:simulator;s=PumpSkid.Model"}\n'
        '      - {name: when, node: "nsu=urn:edge-agent:simulator;s=PumpSkid.SampleTime"}\n'
    )
    driver = OpcUaDriver(parse_config(text).devices[0])  # type: ignore[arg-type]
    await driver.connect()
    try:
        batch = await driver.read(driver.groups[0])
    finally:
        await driver.close()
    samples = {s.tag: s for s in batch.samples()}
    assert samples["model"].value == "EA-PUMP-SKID-01"
    assert samples["when"].quality is Quality.GOOD and abs(batch.values[1] - batch.ts) < 5
