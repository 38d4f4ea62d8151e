"""An agent scoring a model on tags it only receives over MQTT: four from JSON topics, four Sparkplug B metrics.

The pump fixture bundle's eight inputs are published by a plain JSON client and a Sparkplug node (encoded with
tests/sparkplug_wire.py) every 50 ms; the agent polls nothing. Normal values score below the threshold; suction
pressure 30 scales low starts an anomaly whose top contributor is that tag.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from helpers import Broker, latest_value, wait_for
from sparkplug_wire import DataType
from spnode import SparkplugNode
from test_mqtt_json import Publisher

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.scoring.bundle import load_bundle
from edge_agent.types import AnomalyEvent, EventType, Quality, Score

BUNDLE = Path(__file__).parents[2] / "fixtures" / "pump-i8.tflite"
META = load_bundle(BUNDLE).metadata
JSON_TAGS, SPB_TAGS = META.inputs[:4], META.inputs[4:]
MEANS = dict(zip(META.inputs, META.normalisation.mean, strict=True))
SPB_METRICS = {f"Pump/{tag}": (i + 1, DataType.FLOAT, MEANS[tag]) for i, tag in enumerate(SPB_TAGS)}


def _config(broker: Broker) -> str:
    json_tags = "".join(f"      - {{name: {t}, topic: uns/pump/{t}, path: $.v}}\n" for t in JSON_TAGS)
    spb_tags = "".join(f"      - {{name: {t}, metric: Pump/{t}}}\n" for t in SPB_TAGS)
    return (
        "agent: {id: uns-1, site: lab}\n"
        "devices:\n"
        "  - name: uns\n    type: mqtt\n"
        f"    url: {broker.url}\n    poll_interval: 100ms\n    stale_after: 2s\n"
        "    sparkplug: {group_id: lab, edge_node_id: skid, device_id: pump}\n"
        f"    tags:\n{json_tags}{spb_tags}"
        f"models:\n  - name: pump\n    file: {BUNDLE}\n    hysteresis: {{exit_ratio: 0.8, min_duration: 400ms}}\n"
    )


class Plant:
    """Publishes every input each 50 ms from a thread, at the bundle's means or with suction pressure low."""

    def __init__(self, broker: Broker) -> None:
        self.json = Publisher(broker.port)
        self.node = SparkplugNode(broker.port, "lab", "skid", "pump", metrics=SPB_METRICS)
        self.cavitating = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.node.birth()
        for _ in range(1200):  # at most a minute
            if self.stop.wait(0.05):
                return
            for tag in JSON_TAGS:
                value = MEANS[tag]
                if self.cavitating and tag == "pump.suction_pressure":
                    value -= 30 * META.normalisation.scale[0]
                self.json.send(f"uns/pump/{tag}", {"v": value}, qos=0)
            self.node.data({f"Pump/{t}": MEANS[t] for t in SPB_TAGS})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.node.close()
        self.json.close()


async def test_a_model_scores_tags_received_only_over_mqtt(broker: Broker) -> None:
    events: list[AnomalyEvent] = []
    scores: list[Score] = []
    agent = Agent(parse_config(_config(broker)), on_event=events.append, on_score=scores.append)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    plant = Plant(broker)
    try:
        await wait_for(lambda: agent.pollers[0].stats().connected, timeout=10, what="the subscription")
        plant.thread.start()
        await wait_for(
            lambda: sum(s.score is not None for s in scores) >= 5, timeout=20, what="scores of MQTT-only tags"
        )
        normal = [s for s in scores if s.score is not None]
        assert all(s.score < s.threshold for s in normal), [s.score for s in normal]
        for tag in META.inputs:
            latest = latest_value(agent, tag)
            assert latest is not None and latest[1] == Quality.GOOD, tag
        plant.cavitating = True
        await wait_for(lambda: any(e.type is EventType.START for e in events), timeout=20, what="an anomaly")
        start = next(e for e in events if e.type is EventType.START)
        assert start.model == "pump"
        assert max(start.contributions, key=lambda t: start.contributions[t]) == "pump.suction_pressure"
    finally:
        plant.close()
        stop.set()
        await asyncio.wait_for(task, 15)
