"""The MQTT input driver's own counters in the agent's /metrics (through the poller's stats), against mosquitto.

An agent with one `mqtt` device and no model is fed good values, then payloads it cannot use (not JSON, a
string where a float belongs); /metrics, scraped over HTTP, shows `edge_agent_driver_events_total` with the
device label rising by exactly what was sent.
"""

from __future__ import annotations

import asyncio

from helpers import Broker, free_port, http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_mqtt_json import Publisher

from edge_agent.agent import Agent
from edge_agent.config import parse_config

DEVICE = "uns"


def _config(broker: Broker, port: int) -> str:
    return (
        "agent: {id: uns-1, site: lab}\n"
        "devices:\n"
        f"  - name: {DEVICE}\n    type: mqtt\n    url: {broker.url}\n    poll_interval: 100ms\n"
        "    tags:\n      - {name: flow, topic: plant/flow, path: $.v}\n"
        f"observe: {{listen: '127.0.0.1:{port}'}}\n"
    )


async def events(port: int) -> dict[str, float]:
    """edge_agent_driver_events_total of the device, by event, from one scrape."""
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return {
        s.labels["event"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edge_agent_driver_events_total" and s.labels["device"] == DEVICE
    }


async def test_malformed_payloads_raise_the_devices_counter_in_metrics(broker: Broker) -> None:
    port = free_port()
    agent = Agent(parse_config(_config(broker, port)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    pub = Publisher(broker.port)
    try:
        await wait_for(lambda: all(d.connected for d in agent.stats().devices), timeout=20, what="the device up")
        for v in (1.5, 2.5):
            await asyncio.to_thread(pub.send, "plant/flow", {"v": v})
        await wait_for(lambda: dict(agent.stats().devices[0].driver)["received"] >= 2, timeout=10, what="2 received")
        before = await events(port)
        assert before["received"] == 2
        assert before["malformed"] == 0
        assert {"dropped", "stale", "rebirths", "untrusted", "historical", "deaths"} <= before.keys()

        await asyncio.to_thread(pub.send, "plant/flow", b"{not json")
        await asyncio.to_thread(pub.send, "plant/flow", {"v": "high"})
        await wait_for(lambda: dict(agent.stats().devices[0].driver)["received"] >= 4, timeout=10, what="4 received")
        after = await events(port)
        assert after["received"] == 4
        assert after["malformed"] == 2
        assert after["dropped"] == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await asyncio.to_thread(pub.close)
