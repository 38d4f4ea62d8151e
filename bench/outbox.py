"""Benchmark: durable enqueue rate into the outbox, and replay rate to mosquitto after an outage.

- enqueue: events/s made durable (committed, fsynced for sync: full) — raw `Outbox.put` at several batch
  sizes (one fsync per put), and the whole producer path `OutboxWriter.put_event` (payload encoding,
  the writer task's group commit) with each sync setting;
- replay: an outbox holding N events (an outage), mosquitto comes up, events/s acknowledged by mosquitto
  (PUBACK, rows deleted) until the outbox is empty; with no subscriber and with a QoS 1 subscriber process.

    python bench/outbox.py [--events 100000] [--dir /tmp]

Speed is noisy on a shared machine: run it twice and read the orders of magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import paho.mqtt
import paho.mqtt.client
from harness import cpu_model, mosquitto_path, start_mosquitto

from edge_agent.config import MqttSection, OutboxSection
from edge_agent.outbox import Entry, Outbox
from edge_agent.outbox.writer import OutboxWriter
from edge_agent.publish import deliver
from edge_agent.publish.mqtt import MqttPublisher
from edge_agent.records import encode, event_payload
from edge_agent.scoring.detector import new_event_id
from edge_agent.types import AnomalyEvent, EventType, Severity

SUBSCRIBER = """
import sys, time, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, n = int(sys.argv[1]), int(sys.argv[2])
got, done = [0], threading.Event()
def on_message(c, u, m):
    got[0] += 1
    if got[0] >= n:
        done.set()
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub")
c.on_message = on_message
c.on_connect = lambda c, u, f, r, p: c.subscribe("bench/#", qos=1)
c.connect("127.0.0.1", port)
c.loop_start()
print("ready", flush=True)
done.wait(600)
print(got[0], flush=True)
"""


def event(seq: int) -> AnomalyEvent:
    """A realistic event (3 contributions, 8 values): ~650 bytes of JSON."""
    t = time.time()
    return AnomalyEvent(
        type=EventType.START,
        event_id=new_event_id(t, seq),
        anomaly_id=f"{seq:016x}",
        seq=seq,
        agent="press-line-3",
        site="plant-a",
        model="pump-skid",
        model_version="1.0.0",
        model_sha256="ab" * 32,
        window_start=t - 6.4,
        window_end=t,
        score=2.5,
        threshold=1.0,
        severity=Severity.MAJOR,
        contributions={"pump1.pressure": 0.6, "pump1.flow": 0.3, "motor.current": 0.1},
        values={f"tag{i}": 1.5 * i for i in range(8)},
        started_at=t,
        peak_score=2.5,
    )


def bench_put(directory: Path, payloads: list[bytes], batch: int, limit: float = 3.0) -> float:
    """Events/s through Outbox.put in batches of `batch` (one fsynced transaction each), for at most `limit` s."""
    path = directory / f"put-{batch}.db"
    box = Outbox(path)
    box.open()
    n, start = 0, time.perf_counter()
    while n < len(payloads) and time.perf_counter() - start < limit:
        box.put([Entry("bench/events/pump-skid", p, seq=n + k) for k, p in enumerate(payloads[n : n + batch])])
        n += batch
    rate = n / (time.perf_counter() - start)
    box.close()
    return rate


def mqtt(url: str, window: int = 256) -> MqttSection:
    return MqttSection(url=url, topic_prefix="bench", window=window, reconnect_initial=0.05, reconnect_max=0.2)


async def bench_publish(directory: Path, events: list[AnomalyEvent], sync: str) -> float:
    """Events/s through put_event until all are committed (broker down: pure enqueue).

    The producer yields every 100 events and waits for the writer when 5,000 are queued in memory, as a
    busy agent would (the queue is bounded; a producer that never yields starves the writer thread).
    """
    section = OutboxSection.model_validate({"path": directory / f"pub-{sync}.db", "sync": sync})
    config = mqtt("mqtt://127.0.0.1:1")
    writer = OutboxWriter(section, config, agent_id="bench")
    pub = MqttPublisher(config, writer, agent_id="bench")
    await writer.open()
    task = asyncio.create_task(deliver(writer, pub))
    start = time.perf_counter()
    for i in range(0, len(events), 100):
        for e in events[i : i + 100]:
            writer.put_event(e)
        if writer.pending > 5000:
            await writer.flush()
        else:
            await asyncio.sleep(0)
    await writer.flush()
    rate = len(events) / (time.perf_counter() - start)
    dropped = writer.stats().outbox
    assert dropped is not None and sum(dropped.dropped.values()) == 0, dropped
    pub.stop()
    await task
    return rate


def spawn_subscriber(port: int, n: int) -> subprocess.Popen[str]:
    """A QoS 1 subscriber in its own process (its own GIL), subscribed when this returns."""
    sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, str(port), str(n)], stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    sub.stdout.readline()
    time.sleep(0.2)
    return sub


async def bench_replay(directory: Path, payloads: list[bytes], window: int, subscriber: bool) -> float:
    """Events/s acknowledged by mosquitto, draining an outbox that holds len(payloads) events."""
    path = directory / f"replay-{window}-{subscriber}.db"
    box = Outbox(path)
    box.open()
    for i in range(0, len(payloads), 5000):
        box.put([Entry("bench/events/pump-skid", p, seq=i + k) for k, p in enumerate(payloads[i : i + 5000])])
    box.close()
    broker, port = start_mosquitto(directory)
    sub = None
    try:
        if subscriber:
            sub = await asyncio.to_thread(spawn_subscriber, port, len(payloads))
        config = mqtt(f"mqtt://127.0.0.1:{port}", window)
        writer = OutboxWriter(OutboxSection(path=path), config, agent_id="bench")
        pub = MqttPublisher(config, writer, agent_id="bench")
        await writer.open()
        start = time.perf_counter()
        task = asyncio.create_task(deliver(writer, pub))
        await pub.wait_drained()
        rate = len(payloads) / (time.perf_counter() - start)
        pub.stop()
        await task
        if sub is not None and sub.stdout is not None:
            got = int(sub.stdout.readline() or 0)
            assert got >= len(payloads), f"subscriber got {got}"
        return rate
    finally:
        if sub is not None:
            sub.kill()
        broker.send_signal(signal.SIGTERM)
        broker.wait(5)


def bench_paho_alone(directory: Path, payloads: list[bytes]) -> float:
    """Reference: stock paho by itself (no outbox, no asyncio), 32 QoS 1 messages in flight, acks/s.

    The next message is published from paho's own on_publish callback, the cheapest way paho can keep a
    window full. (Publishing everything up front is quadratic: paho scans its whole queue on every ack.)
    The publisher's client is faster than stock paho per message (buffered socket, cheap PUBACKs), so
    replay can beat this reference.
    """
    import threading

    from paho.mqtt.enums import CallbackAPIVersion

    broker, port = start_mosquitto(directory)
    done, sent, acked = threading.Event(), [0], [0]

    def send(client: paho.mqtt.client.Client) -> None:
        client.publish("bench/events/pump-skid", payloads[sent[0]], qos=1)
        sent[0] += 1

    def on_publish(client: paho.mqtt.client.Client, *_: object) -> None:
        acked[0] += 1
        if sent[0] < len(payloads):
            send(client)
        elif acked[0] >= len(payloads):
            done.set()

    client = paho.mqtt.client.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(32)
    client.on_publish = on_publish
    try:
        client.connect("127.0.0.1", port)
        start = time.perf_counter()
        for _ in range(32):  # before the network thread runs: no race with on_publish
            send(client)
        client.loop_start()
        done.wait(600)
        rate = acked[0] / (time.perf_counter() - start)
        client.disconnect()
        client.loop_stop()
        return rate
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(5)


def machine() -> str:
    cpu = cpu_model()
    mosq = subprocess.run([mosquitto_path(), "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    load = os.getloadavg()
    return (
        f"machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, load {load[0]:.1f}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, paho-mqtt {paho.mqtt.__version__}, "
        f"{mosq}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where the outbox files go (the disk under test)")
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        directory = Path(d)
        events = [event(i + 1) for i in range(n)]
        payloads = [encode(event_payload(e)) for e in events]
        size = sum(map(len, payloads)) // n
        rows: list[tuple[str, str, str]] = []
        for batch in (1, 100, 1000):
            rate = bench_put(directory, payloads, batch)
            rows.append((f"Outbox.put, {batch} per transaction", "full (fsync per put)", f"{rate:,.0f}"))
        for sync in ("full", "batched"):
            rate = await bench_publish(directory, events, sync)
            label = "fsync per commit, group commit" if sync == "full" else "commit every 200 ms"
            rows.append((f"put_event → outbox ({n:,} events)", f"{sync} ({label})", f"{rate:,.0f}"))
        for window, subscriber in ((256, False), (256, True), (32, False)):
            rate = await bench_replay(directory, payloads, window, subscriber)
            who = "a QoS 1 subscriber process" if subscriber else "no subscriber"
            label = f"replay {n:,} events to mosquitto, window {window}, {who}"
            rows.append((label, "acks: no fsync", f"{rate:,.0f}"))
        rate = bench_paho_alone(directory, payloads)
        label = f"reference: stock paho alone, {n:,} QoS 1 publishes, 32 in flight, no outbox"
        rows.append((label, "-", f"{rate:,.0f}"))
    print(machine())
    print(f"event payload: {size} bytes; outbox on {args.dir or tempfile.gettempdir()}")
    print("| measurement | sync | events/s |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    asyncio.run(main())
