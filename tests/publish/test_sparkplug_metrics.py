"""/metrics of an agent running both payloads (mqtt.payloads: [json, sparkplug]) against mosquitto, scraped over HTTP.

Each sink's publisher series carry a `sink` label; the Sparkplug node adds its own: bdSeq (the one its NBIRTH
carries), births, rebirth commands, DDEATHs and the primary host's state, each followed as the host goes
online, asks for a rebirth and a PLC goes away.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from helpers import Broker, ModbusPeer, free_port, http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families
from sparkplug_host import SparkplugHost
from test_sparkplug_lifecycle import GROUP, NODE, _config, plc  # noqa: F401 (plc: the fixture)

from edge_agent.agent import Agent
from edge_agent.config import load_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of /metrics by name and labels."""
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def at(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (KeyError names what the scrape had instead)."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"{name}{labels} not in {sorted(k for k in samples if k[0] == name)}")
    return samples[key]


async def test_both_sinks_and_the_sparkplug_node_reach_metrics(
    broker: Broker,
    plc: ModbusPeer,  # noqa: F811
    tmp_path: Path,
) -> None:
    host = SparkplugHost(broker.port, GROUP, host_id="scada-1")
    path = _config(tmp_path, broker, plc, host="scada-1", payloads="[json, sparkplug]")
    port = free_port()
    path.write_text(path.read_text() + f"observe: {{listen: '127.0.0.1:{port}'}}\n")
    agent = Agent(load_config(path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        # the primary host is offline: the JSON sink publishes, the Sparkplug node is connected and holds back
        await wait_for(lambda: agent.sink is not None and agent.sink.connected, timeout=20, what="both sinks up")
        await wait_for(lambda: (p := agent.stats().publisher) is not None and p.acked >= 2, timeout=20, what="acks")
        m = await scrape(port)
        assert at(m, "edge_agent_mqtt_connected", sink="json") == 1
        assert at(m, "edge_agent_mqtt_connected", sink="sparkplug") == 1
        assert at(m, "edge_agent_mqtt_acked_total", sink="json") >= 2
        assert at(m, "edge_agent_mqtt_published_total", sink="sparkplug") == 0
        assert at(m, "edge_agent_sparkplug_primary_host_online", host="scada-1") == 0
        assert at(m, "edge_agent_sparkplug_births_total") == 0
        # latencies are the JSON sink's only (the node publishes at QoS 0; telemetry is QoS 0 here too: no count)
        assert ("edge_agent_mqtt_publish_seconds_count", frozenset({("sink", "json")})) in m
        assert not [
            k for k in m if k[0].startswith("edge_agent_mqtt_publish_seconds") and ("sink", "sparkplug") in k[1]
        ]

        # online: births, then data; the bdSeq metric is the one the NBIRTH carried
        host.state(True, int(time.time() * 1000))
        await wait_for(lambda: host.of("DBIRTH", "plc1"), timeout=20, what="DBIRTH")
        m = await scrape(port)
        assert at(m, "edge_agent_sparkplug_primary_host_online", host="scada-1") == 1
        assert at(m, "edge_agent_sparkplug_births_total") == 1
        assert at(m, "edge_agent_sparkplug_bdseq") == host.of("NBIRTH")[0].payload.metric("bdSeq").value
        assert at(m, "edge_agent_mqtt_published_total", sink="sparkplug") >= 2  # NBIRTH, DBIRTH
        assert at(m, "edge_agent_sparkplug_rebirth_requests_total") == 0

        # a rebirth command: counted, and a second NBIRTH
        host.rebirth(NODE)
        await wait_for(lambda: len(host.of("NBIRTH")) >= 2, timeout=20, what="the rebirth")
        m = await scrape(port)
        assert at(m, "edge_agent_sparkplug_rebirth_requests_total") == 1
        assert at(m, "edge_agent_sparkplug_births_total") == 2

        # the PLC goes away: a DDEATH, counted
        assert at(m, "edge_agent_sparkplug_device_deaths_total") == 0
        await plc.stop()
        await wait_for(lambda: host.of("DDEATH", "plc1"), timeout=20, what="DDEATH")
        m = await scrape(port)
        assert at(m, "edge_agent_sparkplug_device_deaths_total") == len(host.of("DDEATH", "plc1"))
        assert host.problems == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        host.close()
