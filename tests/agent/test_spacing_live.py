"""A running agent says once, and counts in its stats, that a model's tags arrive far slower than its bundle samples.

A real pymodbus peer polled every 500 ms for the fixture bundle (0.2 s samples): the warning, its counter, and
no warning for the same model polled every 100 ms.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest
from helpers import ModbusPeer, wait_for

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.scoring.bundle import load_bundle

I8 = Path(__file__).parents[1] / "fixtures" / "pump-i8.tflite"
META = load_bundle(I8).metadata


def config(port: int, poll: str) -> str:
    tags = "".join(
        f"      - {{name: {tag}, address: '{40001 + 2 * i}', type: float32}}\n" for i, tag in enumerate(META.inputs)
    )
    return (
        "agent: {id: spacing-1, site: lab}\n"
        "devices:\n"
        f"  - name: pump\n    type: modbus\n    host: 127.0.0.1\n    port: {port}\n    poll_interval: {poll}\n"
        f"    timeout: 500ms\n    tags:\n{tags}"
        f"models:\n  - name: pump\n    file: {I8}\n"
    )


@pytest.mark.parametrize(("poll", "slow"), [("500ms", True), ("100ms", False)])
async def test_tags_polled_slower_than_the_model_samples_are_said_once(
    modbus_peer: ModbusPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture, poll: str, slow: bool
) -> None:
    for i, mean in enumerate(META.normalisation.mean):
        modbus_peer.place("holding", 2 * i, list(struct.unpack(">HH", struct.pack(">f", mean))))
    path = tmp_path / "agent.yaml"
    path.write_text(config(modbus_peer.port, poll))
    caplog.set_level(logging.INFO, logger="edge_agent.scoring.spacing")
    agent = Agent(load_config(path), source=path, watch_interval=0)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(
            lambda: any(s.spacing is not None for s in agent.stats().spacing),
            timeout=20,
            what="the model's tags were measured",
        )
        (stats,) = agent.stats().spacing
        assert stats.model == "pump" and stats.expected == META.sample_interval
        assert stats.spacing is not None and (stats.spacing > 2 * META.sample_interval) is slow
        assert stats.slow is slow and stats.warnings == int(slow)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)
    said = [r.getMessage() for r in caplog.records if r.name == "edge_agent.scoring.spacing"]
    if slow:
        assert (
            len(said) == 1
            and said[0].startswith("model pump: pump.")
            and "but the bundle samples every 0.2s" in said[0]
        )
    else:
        assert said == []
