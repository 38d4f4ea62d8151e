"""Benchmark: CPU per value of the MQTT input driver (`type: mqtt`), JSON and Sparkplug B, against stock paho.

One mosquitto on a free 127.0.0.1 port; a publisher subprocess (its CPU is not counted) sends a burst of
messages at QoS 0 as fast as it can; this process receives them, and its CPU time (time.process_time) over the
burst, divided by the values received, is the cost per value. For each payload kind, in the same run:

- reference: a stock paho subscriber that only counts messages (json: and json.loads each payload; sparkplug:
  and decodes each with the agent's protobuf classes), i.e. the least any MQTT input in Python costs;
- driver: an MqttDriver subscribed to the same topics, pushing batches to a sink that counts values.

    python bench/mqtt_input.py [--tags 100] [--messages 20000] [--metrics 100] [--births 2000]

JSON: --tags topics, one value each, --messages messages in all. Sparkplug: one DDATA per message carrying
--metrics metrics by alias, --births messages. Speed is noisy on a shared machine: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from harness import cpu_model, start_mosquitto, stop_process
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import parse_config
from edge_agent.drivers import REGISTRY
from edge_agent.drivers.mqtt.driver import MqttDriver
from edge_agent.sparkplug.proto import Payload
from edge_agent.types import SampleBatch

PUBLISHER = r"""
import sys, json, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from edge_agent.sparkplug.proto import Payload
port, kind, n, width = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", port)
c.loop_start()
sys.stdin.readline()  # go
if kind == "json":
    for i in range(n):
        c.publish(f"bench/t{i % width}", json.dumps({"value": i * 0.5}), qos=0)
else:
    births = Payload(seq=0)
    m = births.metrics.add(); m.name = "bdSeq"; m.datatype = 8; m.long_value = 0
    c.publish("spBv1.0/g/NBIRTH/n", births.SerializeToString(), qos=1).wait_for_publish()
    d = Payload(seq=1)
    for j in range(width):
        m = d.metrics.add(); m.name = f"m{j}"; m.alias = j + 1; m.datatype = 10; m.double_value = 0.0
    c.publish("spBv1.0/g/DBIRTH/n/d", d.SerializeToString(), qos=1).wait_for_publish()
    for i in range(n):
        p = Payload(seq=(i + 2) % 256, timestamp=int(time.time() * 1000))
        for j in range(width):
            m = p.metrics.add(); m.alias = j + 1; m.double_value = i + j * 0.5
        c.publish("spBv1.0/g/DDATA/n/d", p.SerializeToString(), qos=0)
c.publish("bench/done", b"1", qos=1).wait_for_publish()
c.disconnect(); c.loop_stop()
"""


def publisher(port: int, kind: str, n: int, width: int) -> subprocess.Popen[str]:
    """The publisher subprocess, connected and waiting for a line on stdin to start."""
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(port), kind, str(n), str(width)], stdin=subprocess.PIPE, text=True
    )


def go(proc: subprocess.Popen[str]) -> None:
    """Start the burst."""
    time.sleep(0.5)  # connected by now
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def reference(port: int, kind: str, n: int, width: int) -> tuple[float, int]:
    """(CPU seconds, values) of a stock paho subscriber that only decodes."""
    done = threading.Event()
    count = [0]

    def on_message(client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == "bench/done":
            done.set()
        elif kind == "json":
            json.loads(msg.payload)
            count[0] += 1
        else:
            metrics = len(Payload.FromString(msg.payload).metrics)
            count[0] += metrics if "/DDATA/" in msg.topic else 0  # births are not counted as values

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe([("bench/#", 0), ("spBv1.0/#", 0)])
    c.loop_start()
    proc = publisher(port, kind, n, width)
    go(proc)
    t0 = time.process_time()
    if not done.wait(120):
        raise RuntimeError("the burst did not end")
    cpu = time.process_time() - t0
    proc.wait(30)
    c.disconnect()
    c.loop_stop()
    return cpu, count[0]


async def driver(port: int, kind: str, n: int, width: int) -> tuple[float, int, int]:
    """(CPU seconds, values pushed, values received) of an MqttDriver on the same burst."""
    if kind == "json":
        tags = "".join(f"      - {{name: t{i}, topic: bench/t{i}, path: $.value}}\n" for i in range(width))
        extra = ""
    else:
        tags = "".join(f"      - {{name: m{i}, metric: m{i}}}\n" for i in range(width))
        extra = "    sparkplug: {group_id: g, edge_node_id: n, device_id: d, request_rebirth: false}\n"
    tags += "      - {name: done, topic: bench/done}\n"
    cfg = parse_config(
        "devices:\n  - name: bench\n    type: mqtt\n"
        f"    url: mqtt://127.0.0.1:{port}\n    qos: 0\n    poll_interval: 10ms\n    stale_after: 1h\n"
        f"    max_queued: 1000000\n{extra}    tags:\n{tags}"
    )
    drv = REGISTRY["mqtt"].build(cfg.devices[0])
    assert isinstance(drv, MqttDriver)
    pushed = [0]
    done = asyncio.Event()

    def sink(batch: SampleBatch) -> None:
        pushed[0] += len(batch)
        if "done" in batch.tags:
            done.set()

    await drv.connect()
    await drv.subscribe(sink)
    proc = publisher(port, kind, n, width)
    await asyncio.to_thread(go, proc)
    t0 = time.process_time()
    await asyncio.wait_for(done.wait(), 120)
    cpu = time.process_time() - t0
    received = drv.counters.received - (1 if kind == "json" else 3)  # not values: bench/done, and the two births
    await drv.close()
    await asyncio.to_thread(proc.wait, 30)
    return cpu, pushed[0], received * (1 if kind == "json" else width)


def main() -> None:
    """Run both payload kinds, reference then driver, and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tags", type=int, default=100)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--metrics", type=int, default=100)
    ap.add_argument("--births", type=int, default=2000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_mosquitto(Path(tmp))
        try:
            python = platform.python_version()
            print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {python}, paho {paho_version}")
            print("| payload | values | stock paho µs/value | driver µs/value | ratio |")
            print("|---|---|---|---|---|")
            for kind, n, width in (("json", a.messages, a.tags), ("sparkplug", a.births, a.metrics)):
                ref_cpu, ref_values = reference(port, kind, n, width)
                drv_cpu, _, drv_values = asyncio.run(driver(port, kind, n, width))
                ref_us, drv_us = 1e6 * ref_cpu / ref_values, 1e6 * drv_cpu / drv_values
                print(f"| {kind} | {drv_values} | {ref_us:.1f} | {drv_us:.1f} | {drv_us / ref_us:.1f}× |")
        finally:
            stop_process(broker)


if __name__ == "__main__":
    main()
