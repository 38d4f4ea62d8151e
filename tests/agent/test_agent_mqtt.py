"""The whole job: simulator with a fault → agent (three protocols, shipped model) → outbox → mosquitto → subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import jsonschema
from helpers import Broker, Subscriber, free_port, wait_for

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.records import load_schema
from edge_agent.simulate import SimulatorOptions, parse_fault_spec, run_simulator

EXAMPLE = Path(__file__).parents[2] / "examples" / "simulator.yaml"


async def test_fault_reaches_a_subscriber_with_its_end_and_status(broker: Broker, tmp_path: Path) -> None:
    ports = {"SIM_MODBUS_PORT": free_port(), "SIM_OPCUA_PORT": free_port(), "SIM_S7_PORT": free_port()}
    sim = asyncio.create_task(
        run_simulator(
            SimulatorOptions(
                ports={
                    "modbus": ports["SIM_MODBUS_PORT"],
                    "opcua": ports["SIM_OPCUA_PORT"],
                    "s7": ports["SIM_S7_PORT"],
                },
                seed=3,
                faults=(parse_fault_spec("cavitation@5"),),
            )
        )
    )
    environ = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "EDGE_AGENT__MQTT__URL": broker.url,
        "EDGE_AGENT__MQTT__TOPIC_PREFIX": "acme/plant-a/line-3",
        "EDGE_AGENT__OUTBOX__PATH": str(tmp_path / "outbox.db"),
    }
    cfg = load_config(EXAMPLE, environ=environ)
    sub = Subscriber(broker.port, "acme/plant-a/line-3/#")
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(
            lambda: any(m.json().get("type") == "anomaly.start" for m in sub.on("/events/pump-skid")),
            timeout=25,
            step=0.1,
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim
    await wait_for(lambda: any(m.json().get("type") == "anomaly.end" for m in sub.on("/events/pump-skid")), timeout=5)
    await wait_for(lambda: any(m.json().get("state") == "offline" for m in sub.on("/status")), timeout=5)
    sub.close()
    events = [m.json() for m in sub.on("/events/pump-skid")]
    schema = load_schema("event")
    for e in events:
        jsonschema.validate(e, schema)
    start, end = events[0], events[-1]
    assert start["type"] == "anomaly.start" and end["type"] == "anomaly.end" and end["reason"] == "shutdown"
    assert start["anomaly_id"] == end["anomaly_id"] and start["model"]["name"] == "pump-skid"
    assert start["model"]["sha256"] == agent.stats().models[0].bundle_sha256
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    status = [m.json() for m in sub.on("/status")]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    assert json.dumps(status)  # the retained status carries the outbox counters
    assert "outbox" in status[-1] or "outbox" in status[0]
