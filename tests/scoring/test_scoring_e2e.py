"""End to end: the simulator with an injected fault → `run`'s agent with the shipped model → anomaly events.

The agent reads examples/simulator.yaml: the model's inputs come over Modbus, OPC UA (subscribed) and S7
at once. A faulted plant and a fault-free plant (same seed) run side by side for the same time: the first
must raise `anomaly.start` for the right model within a bounded number of scored windows, the second nothing.
Detection is judged on the agent's own data (when it read the fault flag, which windows it scored), not
on the wall clock, so a slow machine that connects late is not a failure; the wait itself stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_port, wait_for

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.monitor import load_models
from edge_agent.simulate import SimulatorOptions, parse_fault_spec, run_simulator
from edge_agent.types import AnomalyEvent, EventType, Score

EXAMPLE = Path(__file__).parents[2] / "examples" / "simulator.yaml"
FAULT_AT = 6.0
RUN_FOR = 22.0  # both plants run at least this long, side by side
DEADLINE = 90.0  # and at most this long, however slow the machine: the faulty one until it has raised an anomaly
DETECT_WITHIN = 50  # scored windows (10 s of data at the model's 0.2 s hop) from the fault flag to anomaly.start


def start_simulator(seed: int, faults: tuple[str, ...] = ()) -> tuple[asyncio.Task[None], dict[str, str]]:
    """All three protocols on free ports, and the environment that points the example at them."""
    ports = {"SIM_MODBUS_PORT": free_port(), "SIM_OPCUA_PORT": free_port(), "SIM_S7_PORT": free_port()}
    options = SimulatorOptions(
        ports={key: ports[f"SIM_{key.upper()}_PORT"] for key in ("modbus", "opcua", "s7")},
        seed=seed,
        faults=tuple(parse_fault_spec(f) for f in faults),
    )
    return asyncio.create_task(run_simulator(options)), {**os.environ, **{k: str(v) for k, v in ports.items()}}


@dataclass
class Case:
    """What one run saw: every anomaly event and every window's score."""

    events: list[AnomalyEvent] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    agent: Agent | None = None


def example_with(model: str, tmp_path: Path) -> Path:
    """examples/simulator.yaml with its model replaced by another shipped bundle of models/ (the same as-is)."""
    if model == "pump-skid-ae.tflite":
        return EXAMPLE
    text = EXAMPLE.read_text()
    assert "../models/pump-skid-ae.tflite" in text
    path = tmp_path / "sim.yaml"
    path.write_text(text.replace("../models/pump-skid-ae.tflite", str(EXAMPLE.parents[1] / "models" / model)))
    return path


async def run_case(config: Path, faults: tuple[str, ...], case: Case, done: asyncio.Event) -> None:
    """Run the simulator and the agent until `done` is set."""
    sim, environ = start_simulator(11, faults)
    cfg = load_config(config, environ=environ)
    agent = case.agent = Agent(cfg, on_event=case.events.append, on_score=case.scores.append)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await done.wait()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim


async def run_both(config: Path) -> tuple[Case, Case]:
    """The faulty and the normal plant side by side: for RUN_FOR, then until the faulty one raised an anomaly."""
    faulty, normal, done = Case(), Case(), asyncio.Event()
    both = asyncio.gather(
        run_case(config, (f"cavitation@{FAULT_AT:g}",), faulty, done), run_case(config, (), normal, done)
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while not both.done():
            elapsed = loop.time() - start
            if elapsed >= DEADLINE or (elapsed >= RUN_FOR and any(e.type is EventType.START for e in faulty.events)):
                break
            await asyncio.sleep(0.5)
    finally:
        done.set()
    await both
    return faulty, normal


# one live run per model kind shipped for the simulator: every kind works in `run`, not only offline
@pytest.mark.parametrize(
    "model", ["pump-skid-ae.tflite", "pump-skid-conv.tflite", "pump-skid-pca.tflite", "pump-skid-ensemble.tflite"]
)
async def test_fault_raises_an_anomaly_and_normal_operation_does_not(model: str, tmp_path: Path) -> None:
    f, n = await run_both(example_with(model, tmp_path))
    assert f.agent is not None and n.agent is not None
    assert f.agent.monitors[0].bundle.sha256 == load_bundle(EXAMPLE.parents[1] / "models" / model).sha256
    faulty, scores, agent_f, normal, agent_n = f.events, f.scores, f.agent, n.events, n.agent
    monitor = agent_f.monitors[0]
    starts = [e for e in faulty if e.type is EventType.START]
    assert starts, f"no anomaly.start; last score {monitor.last_score} vs threshold {monitor.threshold}"
    first = starts[0]
    assert first.model == "pump-skid" and first.model_sha256 == monitor.bundle.sha256
    assert abs(round(first.window_end / 0.2) * 0.2 - first.window_end) < 1e-6  # windows end on the model's grid
    assert monitor.windows_scored > 25
    # when the fault began, as the agent saw it: the first read of the plant's fault flag (S7, every 100 ms)
    fault_seen = fault_time(agent_f)
    assert fault_seen is not None, "the agent never read pump.fault_active as set"
    # not before the fault (a read of the flag lags the plant by at most a poll; 1 s of slack, as before) ...
    assert first.window_end >= fault_seen - 1.0, (first.window_end, fault_seen)
    # ... and within DETECT_WITHIN windows the model actually scored after it (late connections do not count)
    scored_after = [s for s in scores if s.score is not None and fault_seen <= s.t_end <= first.window_end]
    assert len(scored_after) <= DETECT_WITHIN, (len(scored_after), first.window_end - fault_seen)
    assert "pump.suction_pressure" in first.values and first.contributions
    # the open anomaly was closed on shutdown: every start has its end
    assert [e.type for e in faulty].count(EventType.END) == len(starts)
    assert normal == [], [(e.type, e.score, e.threshold) for e in normal]
    assert agent_n.monitors[0].windows_scored > 25


def fault_time(agent: Agent) -> float | None:
    """Time of the first good sample of pump.fault_active that is set, from the agent's own buffers."""
    ts, values, quality = agent.buffers.series("pump.fault_active")
    on = (values > 0.5) & (quality == 0)
    return float(ts[on][0]) if on.any() else None


async def test_startup_calibration_adapts_the_model(tmp_path: Path) -> None:
    sim, environ = start_simulator(5)
    saved = tmp_path / "calibrated.tflite"
    text = EXAMPLE.read_text().replace(
        "    hysteresis: {exit_ratio: 0.8, min_duration: 5s}",
        f"    calibrate: {{mode: startup, samples: 40, save_to: {saved}}}",
    )
    cfg_path = tmp_path / "sim.yaml"
    cfg_path.write_text(text.replace("../models/", f"{EXAMPLE.parent.parent}/models/"))
    cfg = load_config(cfg_path, environ=environ)
    agent = Agent(cfg)
    monitor = agent.monitors[0]
    shipped = monitor.threshold
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        assert monitor.calibrating
        async with asyncio.timeout(20):
            while monitor.calibrating:
                await asyncio.sleep(0.2)
        await wait_for(lambda: monitor.windows_scored >= 3, timeout=20, what="3 windows scored after calibrating")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim
    assert saved.exists() and monitor.threshold != shipped
    # the saved file names the bundle it was calibrated from, so a restart reuses it only for that bundle
    assert load_bundle(saved).metadata.threshold.base_sha256 == load_bundle(cfg.models[0].file).sha256
    (again,) = load_models(cfg)
    assert not again.calibrate and again.bundle.sha256 == load_bundle(saved).sha256
    meta = monitor.bundle.metadata
    assert meta.threshold.rows >= 36 and "startup" in meta.threshold.calibrated_on
    assert monitor.windows_scored >= 3 and monitor.last_score is not None
