"""Live reconfiguration of a running agent, against a real Modbus peer and mosquitto.

The agent reads two devices from one pymodbus peer: `pump` (the model's eight inputs, unchanged all along)
and `aux`. Its config file is edited under it: a tag added to aux, the model's bundle replaced while an
anomaly is open, the file broken, the outbox moved (refused), the file fixed with new MQTT settings.
Judged on what the agent and the broker saw, never on the clock:
- no sample gap on pump: every 100 ms tick between the first reload and the last has its sample in what
  the poller handed on, except the ticks the poller itself counted as overruns; same poller, same
  connection, the same ring (it still holds what was read before);
- no event lost: every event the agent emitted reached a subscriber, their sequence numbers have no hole,
  and every anomaly.start has its end (reason reconfigured for the replaced model's).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import jsonschema
import pytest
from helpers import Broker, ModbusPeer, Subscriber, free_port, http_get, latest_value, wait_for

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.publish.stats import PublisherStats
from edge_agent.records import load_schema
from edge_agent.scoring.bundle import load_bundle
from edge_agent.types import AnomalyEvent, EventType, Quality, SampleBatch, Score

FIXTURES = Path(__file__).parents[1] / "fixtures"
I8, F32 = FIXTURES / "pump-i8.tflite", FIXTURES / "pump-f32.tflite"
META = load_bundle(I8).metadata
PUMP_INTERVAL = 0.1
PREFIX = "t/reload"


def registers(value: float) -> list[int]:
    """A float32 as two big-endian holding registers."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def run_normally(peer: ModbusPeer) -> None:
    """Every model input at the bundle's mean: scores far below the threshold."""
    for i, mean in enumerate(META.normalisation.mean):
        peer.place("holding", 2 * i, registers(mean))


def cavitate(peer: ModbusPeer) -> None:
    """Suction pressure 30 scales below normal: scores far above the threshold."""
    low = META.normalisation.mean[0] - 30 * META.normalisation.scale[0]
    peer.place("holding", 0, registers(low))


def config(
    peer: int,
    broker: str,
    outbox: Path,
    *,
    aux_tags: Iterable[str] = ("aux.a",),
    model: Path = I8,
    keepalive: str = "30s",
    listen: int | None = None,
) -> str:
    pump = "".join(
        f"      - {{name: {tag}, address: '{40001 + 2 * i}', type: float32}}\n" for i, tag in enumerate(META.inputs)
    )
    aux = "".join(f"      - {{name: {tag}, address: '{40101 + 2 * i}'}}\n" for i, tag in enumerate(aux_tags))
    device = "    type: modbus\n    host: 127.0.0.1\n    port: {port}\n    poll_interval: 100ms\n    timeout: 500ms\n"
    return (
        "agent: {id: reload-1, site: lab}\n"
        "devices:\n"
        f"  - name: pump\n{device.format(port=peer)}    tags:\n{pump}"
        f"  - name: aux\n{device.format(port=peer)}    tags:\n{aux}"
        "models:\n"
        f"  - name: pump\n    file: {model}\n    hysteresis: {{exit_ratio: 0.8, min_duration: 400ms}}\n"
        f"mqtt:\n  url: {broker}\n  topic_prefix: {PREFIX}\n  keepalive: {keepalive}\n"
        "  reconnect_initial: 50ms\n  reconnect_max: 500ms\n  status_interval: 1s\n"
        f"outbox: {{path: {outbox}}}\n" + (f"observe: {{listen: '127.0.0.1:{listen}'}}\n" if listen else "")
    )


def missing_ticks(stamps: Iterable[float], interval: float) -> set[int]:
    """Scan ticks (k × interval) between the first and the last stamp that no sample was stamped in."""
    ticks = {math.floor(t / interval + 1e-6) for t in stamps}
    return set(range(min(ticks), max(ticks) + 1)) - ticks if ticks else set()


def test_missing_ticks_finds_a_gap() -> None:
    """The gap check below can fail: a lost sample, or a late one, leaves its tick empty."""
    stamps = [k * 0.1 for k in range(100, 120)]
    assert missing_ticks(stamps, 0.1) == set()
    assert missing_ticks(stamps[:5] + stamps[7:], 0.1) == {105, 106}
    assert missing_ticks([10.0, 10.13, 10.2], 0.1) == set()  # a read stamped late still lands in its tick


class Seen:
    """What the agent handed on: batch times per device, events and scores."""

    def __init__(self) -> None:
        self.stamps: dict[str, list[float]] = {}
        self.events: list[AnomalyEvent] = []
        self.scores: list[Score] = []

    def batch(self, b: SampleBatch) -> None:
        self.stamps.setdefault(b.device, []).append(b.ts)

    def of(self, kind: EventType) -> list[AnomalyEvent]:
        return [e for e in self.events if e.type is kind]


def publisher(agent: Agent) -> PublisherStats:
    stats = agent.stats().publisher
    assert stats is not None
    return stats


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_live_agent_takes_a_new_tag_a_new_model_a_broken_file_and_its_fix(
    modbus_peer: ModbusPeer, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run_normally(modbus_peer)
    modbus_peer.holding[102] = 7  # aux.b, once it is configured
    path, outbox, listen = tmp_path / "agent.yaml", tmp_path / "outbox.db", free_port()

    def write(**kw: object) -> None:
        path.write_text(config(modbus_peer.port, broker.url, outbox, listen=listen, **kw))  # type: ignore[arg-type]

    write()
    seen = Seen()
    sub = Subscriber(broker.port, f"{PREFIX}/#")
    agent = Agent(
        load_config(path),
        source=path,
        watch_interval=0,  # reloads come from reload() alone here; the watch has its own test
        on_batch=seen.batch,
        on_event=seen.events.append,
        on_score=seen.scores.append,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    results = []
    try:
        pump = agent.pollers[0]
        await wait_for(lambda: agent.stats().models[0].windows_scored >= 1, timeout=20, what="the model warmed up")
        cavitate(modbus_peer)
        await wait_for(lambda: len(seen.of(EventType.START)) == 1, timeout=20, what="an anomaly")
        before, t0, oldest = pump.stats(), time.time(), agent.buffers.series("pump.flow")[0][0]

        # 1. a tag added to aux: aux restarts, pump polls on
        write(aux_tags=("aux.a", "aux.b"))
        results.append(await agent.reload())
        await wait_for(lambda: latest_value(agent, "aux.b") == (7.0, Quality.GOOD), what="the new tag")

        # 2. the model's bundle replaced while its anomaly is open: it ends (reconfigured), the new one scores
        write(aux_tags=("aux.a", "aux.b"), model=F32)
        results.append(await agent.reload())
        await wait_for(lambda: len(seen.of(EventType.START)) == 2, timeout=20, what="the new model's anomaly")

        # 3. the file broken: FILE:LINE logged, the previous config runs on
        good = path.read_text()
        lines = good.splitlines()
        line = lines.index("  - name: aux") + 4  # aux's port, numbered from 1
        lines[line - 1] = "    port: seventy"
        path.write_text("\n".join(lines) + "\n")
        results.append(await agent.reload())
        assert agent.config.sha256 != sha256(path)

        # 4. the outbox moved: valid, but refused as a whole (its file cannot move under a running agent)
        path.write_text(good.replace(str(outbox), str(tmp_path / "elsewhere.db")))
        results.append(await agent.reload())

        # 5. fixed, with other MQTT settings: the sink reconnects on the same outbox
        write(aux_tags=("aux.a", "aux.b"), model=F32, keepalive="20s")
        results.append(await agent.reload())
        run_normally(modbus_peer)  # the anomaly recovers: its end goes out through the new connection
        await wait_for(lambda: len(seen.of(EventType.END)) == 2, timeout=20, what="the recovery")
        config_sha = sha256(path)
        await wait_for(
            lambda: any(m.json().get("config_sha256") == config_sha for m in sub.on("/status")),
            timeout=10,
            what="the status of the new config",
        )
        metrics = (await http_get(listen, "/metrics"))[1]
        after, t1, same_poller = pump.stats(), time.time(), agent.pollers[0] is pump
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    events = {e.event_id for e in seen.events}
    await wait_for(lambda: events <= set(sub.event_ids()), timeout=10, what="every event at the subscriber")
    await wait_for(lambda: any(m.json().get("state") == "offline" for m in sub.on("/status")), timeout=5)
    sub.close()

    assert results == ["ok", "ok", "invalid", "failed", "ok"]
    reloads = agent.stats().reloads
    assert (reloads.ok, reloads.invalid, reloads.failed, reloads.config_sha256) == (3, 1, 1, config_sha)
    for result, n in (("ok", 3), ("invalid", 1), ("failed", 1)):
        assert f'edge_agent_config_reloads_total{{result="{result}"}} {n:.1f}' in metrics
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "edge_agent.agent"]
    assert sum(m.startswith(f"{path}:{line}: devices[1].port") for m in errors) == 1, errors
    assert any("outbox.path" in m and "cannot move" in m for m in errors), errors

    # no sample gap on the unchanged device, and it kept its connection and its ring
    stamps = [t for t in seen.stamps["pump"] if t0 <= t <= t1]
    assert len(stamps) > 10
    missing = missing_ticks(stamps, PUMP_INTERVAL)
    assert len(missing) <= after.overruns - before.overruns, sorted(missing)
    assert same_poller and after.failures == before.failures == 0 and after.connected
    assert agent.buffers.series("pump.flow")[0][0] == oldest < t0  # the ring still holds its first sample

    # no event lost: all of them at the subscriber, seq without a hole, every start with its end
    received = {m.json()["event_id"]: m.json() for m in sub.on("/events/")}
    assert set(received) == events
    seqs = sorted(doc["seq"] for doc in received.values())
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    story = [(d["type"], d["reason"], d["model"]["sha256"]) for d in sorted(received.values(), key=lambda d: d["seq"])]
    i8, f32 = load_bundle(I8).sha256, load_bundle(F32).sha256
    assert story == [
        ("anomaly.start", None, i8),
        ("anomaly.end", "reconfigured", i8),
        ("anomaly.start", None, f32),
        ("anomaly.end", "recovered", f32),
    ]
    docs = sorted(received.values(), key=lambda d: d["seq"])
    assert docs[0]["anomaly_id"] == docs[1]["anomaly_id"] and docs[2]["anomaly_id"] == docs[3]["anomaly_id"]
    # the models swapped between two windows: no window scored twice, every one on the grid
    ends = [s.t_end for s in seen.scores]
    assert ends == sorted(set(ends))

    # the status says what runs: the config's sha256 and each model's
    statuses = [m.json() for m in sub.on("/status")]
    for doc in statuses:
        jsonschema.validate(doc, load_schema("status"))
    online = [d for d in statuses if d["state"] == "online"]
    assert online[-1]["config_sha256"] == config_sha and online[-1]["models"] == {"pump": f32}
    assert any(d["state"] == "offline" and d["reason"] == "reconfigured" for d in statuses)


async def test_rows_in_flight_when_the_mqtt_settings_change_reach_the_new_broker(
    modbus_peer: ModbusPeer, broker: Broker, tmp_path: Path
) -> None:
    """The old connection goes dead with events handed to it and never acknowledged; the reload points the
    agent at the broker directly, and those events arrive through the new connection."""
    from publish.mqttpeer import BlackholeProxy

    run_normally(modbus_peer)
    proxy = BlackholeProxy(broker.port)
    path, outbox = tmp_path / "agent.yaml", tmp_path / "outbox.db"
    path.write_text(config(modbus_peer.port, f"mqtt://127.0.0.1:{proxy.port}", outbox))
    seen = Seen()
    sub = Subscriber(broker.port, f"{PREFIX}/events/#")
    agent = Agent(load_config(path), source=path, watch_interval=0, on_event=seen.events.append)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: publisher(agent).connected, what="connected through the proxy")
        await wait_for(lambda: agent.stats().models[0].windows_scored >= 1, timeout=20, what="the model warmed up")
        proxy.blackhole()
        cavitate(modbus_peer)
        await wait_for(lambda: publisher(agent).in_flight >= 1, timeout=20, what="an event in flight")
        assert seen.events and not sub.event_ids()
        path.write_text(config(modbus_peer.port, broker.url, outbox))
        assert await agent.reload() == "ok"
        await wait_for(lambda: {e.event_id for e in seen.events} <= set(sub.event_ids()), timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        proxy.close()
    await wait_for(lambda: {e.event_id for e in seen.events} <= set(sub.event_ids()), timeout=10)
    sub.close()


async def test_the_watch_reloads_a_configmap_swap_and_logs_a_broken_file_once(
    modbus_peer: ModbusPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No SIGHUP: kubelet swaps the ..data symlink of a mounted ConfigMap; the agent sees it by itself."""
    caplog.set_level(logging.INFO)
    modbus_peer.holding[0], modbus_peer.holding[1] = 11, 22
    versions = {
        "v1": "    tags: [{name: a, address: '40001'}]\n",
        "v2": "    tags: [{name: a, address: '40001'}, {name: b, address: '40002'}]\n",
        "v3": "    tags: [{name: a, address: '40001'}, {name: b, address: 40002x}]\n",  # line 8: not an address
    }
    for version, tags in versions.items():
        (tmp_path / f"..{version}").mkdir()
        (tmp_path / f"..{version}" / "agent.yaml").write_text(
            "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n"
            f"    port: {modbus_peer.port}\n    poll_interval: 50ms\n    timeout: 500ms\n{tags}"
        )
    (tmp_path / "..data").symlink_to("..v1")
    path = tmp_path / "agent.yaml"
    path.symlink_to("..data/agent.yaml")

    def swap(version: str) -> None:
        (tmp_path / "..data_tmp").symlink_to(f"..{version}")
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")

    agent = Agent(load_config(path), source=path, watch_interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: latest_value(agent, "a") == (11.0, Quality.GOOD))
        swap("v2")
        await wait_for(lambda: agent.stats().reloads.ok == 1, what="the swap seen")
        await wait_for(lambda: latest_value(agent, "b") == (22.0, Quality.GOOD))
        swap("v3")
        await wait_for(lambda: agent.stats().reloads.invalid == 1, what="the broken file seen")
        await asyncio.sleep(0.5)  # ten more looks at the same broken file
        agent.request_reload()  # SIGHUP: tries again at once, and says why again
        await wait_for(lambda: agent.stats().reloads.invalid == 2)
        swap("v2")
        await wait_for(lambda: agent.stats().reloads.ok == 2, what="the fix seen")
        assert agent.stats().reloads.config_sha256 == sha256(tmp_path / "..v2" / "agent.yaml")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    errors = [r.getMessage() for r in caplog.records if r.name == "edge_agent.agent" and r.levelno >= logging.ERROR]
    assert [m.split(": ")[0] for m in errors if "tags[1].address" in m] == [f"{path}:8"] * 2, errors
    infos = [r.getMessage() for r in caplog.records if r.name == "edge_agent.agent" and "reloaded" in r.getMessage()]
    assert [m.partition("): ")[2] for m in infos] == ["devices restarted: plc", "no changes"]
