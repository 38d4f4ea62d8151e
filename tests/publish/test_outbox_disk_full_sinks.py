"""A full disk under the outbox (a real 1 MiB tmpfs) with both payloads ([json, sparkplug]) and a real mosquitto:
telemetry made while nothing can be written reaches BOTH the JSON subscriber and the Sparkplug host from the memory
queue, none twice per sink, and when space returns what one sink still owes is written for it alone."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from pathlib import Path

from diskfaults import fill, small_fs
from helpers import Broker, ModbusPeer, Subscriber, wait_for
from sparkplug_host import SparkplugHost

from edge_agent.agent import Agent
from edge_agent.config import load_config

GROUP, NODE = "plant-a", "line-3"


def _config(tmp_path: Path, broker: Broker, plc: ModbusPeer, outbox: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"""
agent: {{id: {NODE}, site: lab}}
devices:
  - name: plc1
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 50ms
    timeout: 300ms
    tags:
      - {{name: temp, address: "40001", type: float32, unit: degC}}
mqtt:
  url: {broker.url}
  payloads: [json, sparkplug]
  topic_prefix: acme/line-3
  telemetry_interval: 50ms
  reconnect_initial: 100ms
  reconnect_max: 500ms
  sparkplug: {{group_id: {GROUP}}}
outbox:
  path: {outbox}
""")
    return path


def _temp(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def json_temps(sub: Subscriber) -> list[tuple[str, float]]:
    """(ts, temp) of every JSON telemetry message received, duplicates included."""
    return [
        (doc["ts"], t["value"])
        for doc in (m.json() for m in sub.on("/telemetry/plc1"))
        for t in doc["tags"]
        if t["name"] == "temp"
    ]


def spb_temps(host: SparkplugHost, kinds: tuple[str, ...] = ("DBIRTH", "DDATA")) -> list[tuple[int, float]]:
    """(timestamp, value) of every float metric in the device's DBIRTH and DDATA received, duplicates included.

    The device's first telemetry record is its DBIRTH (values, not nulls): the first value may come there.
    """
    return [
        (m.timestamp, m.value)
        for kind in kinds
        for s in host.of(kind, "plc1")
        for m in s.payload.metrics
        if m.value is not None
    ]


async def test_both_sinks_get_telemetry_made_while_the_disk_is_full(broker: Broker, tmp_path: Path) -> None:
    plc = ModbusPeer()
    plc.place("holding", 0, _temp(1.5))
    await plc.start()
    host = SparkplugHost(broker.port, GROUP)
    sub = Subscriber(broker.port, "acme/line-3/telemetry/#")
    with small_fs(tmp_path / "disk", "1m") as disk:
        filler = fill(disk)
        agent = Agent(load_config(_config(tmp_path, broker, plc, disk / "outbox.db")))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            outbox = agent.outbox
            assert outbox is not None
            values = [100.5 + i for i in range(8)]
            for v in values:  # each value held for a few telemetry intervals, all while nothing can be written
                plc.place("holding", 0, _temp(v))
                await wait_for(lambda v=v: any(t == v for _, t in json_temps(sub)), timeout=20)
                await wait_for(lambda v=v: any(t == v for _, t in spb_temps(host)), timeout=20)
            assert outbox.stats().store_error is not None and not outbox.is_open  # all of it came from memory
            # space returns: the file is written again and the rest goes through it to both sinks
            filler.unlink()
            await wait_for(lambda: outbox.stats().store_error is None, timeout=20)
            plc.place("holding", 0, _temp(555.5))
            await wait_for(lambda: any(t == 555.5 for _, t in json_temps(sub)), timeout=20)
            await wait_for(lambda: any(t == 555.5 for _, t in spb_temps(host)), timeout=20)
            await wait_for(lambda: outbox.depth <= 2, timeout=20)  # both sinks acknowledged what was stored
            st = outbox.stats()
            assert sum(st.dropped.values()) == 0, st.dropped
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            host.close()
            sub.close()
            await plc.stop()
    dup_json = [k for k, n in Counter(json_temps(sub)).items() if n > 1]
    dup_spb = [k for k, n in Counter(spb_temps(host, ("DDATA",))).items() if n > 1]
    assert dup_json == [] and dup_spb == [], (dup_json, dup_spb)
    assert host.problems == []
