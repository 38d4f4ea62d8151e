"""The Sparkplug B edge node against mosquitto and an independent host (tests/sparkplug_host.py, its own decoder).

Ignition-style consumption end to end: births create every tag with its type and unit, data by alias,
a rebirth command restores them, a PLC outage gives DDEATH and DBIRTH, a kill -9 marks them stale
through the NDEATH the broker sends (bdSeq matching the NBIRTH's), a restart's NBIRTH takes the next bdSeq,
a primary host's STATE gates publishing (offline: data waits in the outbox; online: births, then
the stored data with is_historical), and a killed and restarted broker gets the same store and forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import Broker, ModbusPeer, Subscriber, wait_for
from sparkplug_host import SparkplugHost
from sparkplug_wire import DataType

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.outbox import Kind

GROUP = "plant-a"
NODE = "line-3"


def _config(
    tmp_path: Path, broker: Broker, plc: ModbusPeer, *, host: str | None = None, payloads: str = "[sparkplug]"
) -> Path:
    primary = f", primary_host_id: {host}" if host else ""
    text = f"""
agent: {{id: {NODE}, site: lab}}
devices:
  - name: plc1
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    timeout: 300ms
    backoff: {{initial: 100ms, max: 300ms}}
    tags:
      - {{name: temp, address: "40001", type: float32, unit: degC, description: bearing temperature}}
      - {{name: speed, address: "40003", type: int16, unit: rpm}}
      - {{name: running, address: "00001"}}
mqtt:
  url: {broker.url}
  payloads: {payloads}
  topic_prefix: acme/line-3
  telemetry_interval: 100ms
  reconnect_initial: 100ms
  reconnect_max: 500ms
  sparkplug: {{group_id: {GROUP}{primary}}}
outbox:
  path: {tmp_path / "outbox.db"}
"""
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def _float_registers(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


@pytest.fixture
async def plc() -> AsyncIterator[ModbusPeer]:
    peer = ModbusPeer()
    peer.place("holding", 0, _float_registers(21.5))
    peer.place("holding", 2, [(-7) & 0xFFFF])
    peer.coils[0] = True
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


def _start_agent(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--output", "none", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


async def test_life_cycle_births_data_rebirth_outage_and_kill(broker: Broker, plc: ModbusPeer, tmp_path: Path) -> None:
    host = SparkplugHost(broker.port, GROUP)
    config = _config(tmp_path, broker, plc)
    agent = _start_agent(config)
    try:
        # births: NBIRTH (seq 0, bdSeq, rebirth control) and a DBIRTH creating every tag with type and unit
        await wait_for(
            lambda: host.of("DBIRTH", "plc1") and host.node(NODE).devices["plc1"]["temp"].value == 21.5, timeout=20
        )
        nbirth = host.of("NBIRTH")[0].payload
        bdseq = nbirth.metric("bdSeq").value
        assert nbirth.seq == 0
        assert nbirth.metric("Node Control/Rebirth").value is False
        assert nbirth.metric("Node Control/Rebirth").datatype == DataType.BOOLEAN
        tags = host.node(NODE).devices["plc1"]
        assert {n: (t.datatype, t.unit) for n, t in tags.items()} == {
            "temp": (DataType.FLOAT, "degC"),
            "speed": (DataType.INT16, "rpm"),
            "running": (DataType.BOOLEAN, None),
        }
        assert tags["temp"].description == "bearing temperature"
        await wait_for(lambda: tags["speed"].value == -7 and tags["running"].value is True, timeout=10, what=str(tags))

        # data by exception, by alias: one changed register → a DDATA with that metric only
        before = len(host.of("DDATA", "plc1"))
        plc.place("holding", 0, _float_registers(30.25))
        await wait_for(lambda: host.node(NODE).devices["plc1"]["temp"].value == 30.25, timeout=10)
        change = next(
            s.payload for s in host.of("DDATA", "plc1")[before:] if any(m.value == 30.25 for m in s.payload.metrics)
        )
        assert all(m.name is None and m.alias is not None for m in change.metrics)
        assert [m.value for m in change.metrics] == [30.25]

        # rebirth on command: NBIRTH again with the same bdSeq and seq 0, then the DBIRTH
        host.rebirth(NODE)
        await wait_for(lambda: len(host.of("NBIRTH")) == 2 and len(host.of("DBIRTH", "plc1")) == 2, timeout=10)
        again = host.of("NBIRTH")[1].payload
        assert again.metric("bdSeq").value == bdseq and again.seq == 0
        assert host.node(NODE).devices["plc1"]["temp"].value == 30.25  # restored from the births

        # PLC outage: DDEATH (tags stale), then DBIRTH when it answers again
        await plc.stop()
        await wait_for(lambda: host.of("DDEATH", "plc1"), timeout=20)
        assert all(t.stale for t in host.node(NODE).devices["plc1"].values())
        births = len(host.of("DBIRTH", "plc1"))
        plc.place("holding", 0, _float_registers(40.0))
        await plc.start()
        await wait_for(lambda: len(host.of("DBIRTH", "plc1")) > births, timeout=20)
        await wait_for(lambda: host.node(NODE).devices["plc1"]["temp"].value == 40.0, timeout=10)
        assert not any(t.stale for t in host.node(NODE).devices["plc1"].values())

        # kill -9: the broker publishes the will, an NDEATH whose bdSeq matches the NBIRTH's: tags go stale
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        await wait_for(lambda: host.of("NDEATH"), timeout=30)  # keepalive × 1.5 at most
        assert host.of("NDEATH")[0].payload.metric("bdSeq").value == bdseq
        assert host.node(NODE).online is False
        assert all(t.stale for t in host.node(NODE).devices["plc1"].values())

        # a restarted node's NBIRTH takes the next bdSeq (kept beside the outbox)
        agent = _start_agent(config)
        await wait_for(lambda: len(host.of("NBIRTH")) == 3, timeout=20)
        assert host.of("NBIRTH")[2].payload.metric("bdSeq").value == (bdseq + 1) % 256
        await wait_for(lambda: len(host.of("DBIRTH", "plc1")) > births + 1, timeout=10)
        assert not any(t.stale for t in host.node(NODE).devices["plc1"].values())

        # the clean stop publishes the NDEATH itself (a DISCONNECT drops the will)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, agent.stderr.read().decode() if agent.stderr else ""
        await wait_for(lambda: len(host.of("NDEATH")) == 2, timeout=10)
        assert host.of("NDEATH")[1].payload.metric("bdSeq").value == (bdseq + 1) % 256
        assert host.problems == []  # seq continuity, aliases known, births before data, bdSeq matches
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        host.close()


async def test_primary_host_state_gates_publishing(broker: Broker, plc: ModbusPeer, tmp_path: Path) -> None:
    host = SparkplugHost(broker.port, GROUP, host_id="scada-1")
    cfg = load_config(_config(tmp_path, broker, plc, host="scada-1"))
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        sink, outbox = agent.sink, agent.outbox
        assert sink is not None and outbox is not None
        # connected, but the primary host never said online: nothing published, telemetry waits in the outbox
        await wait_for(lambda: sink.connected and outbox.depth >= 3, timeout=20)
        assert sink.stats().published == 0 and host.seen == []

        # online: births first, then what the outbox kept, with is_historical
        host.state(True, int(time.time() * 1000))
        await wait_for(lambda: host.of("DDATA", "plc1") or len(host.of("DBIRTH", "plc1")) > 0, timeout=20)
        order = [s.type for s in host.seen]
        assert order[:2] == ["NBIRTH", "DBIRTH"]
        plc.place("holding", 0, _float_registers(55.5))
        await wait_for(lambda: host.node(NODE).devices["plc1"]["temp"].value == 55.5, timeout=10)

        # offline: publishing stops, rows pile up in the outbox
        host.state(False, int(time.time() * 1000))
        await wait_for(lambda: outbox.depth >= 3, timeout=20)
        plc.place("holding", 0, _float_registers(66.5))
        await wait_for(lambda: outbox.depth >= 6, timeout=20)
        published = sink.stats().published
        seen = len(host.seen)
        assert all(m.value != 66.5 for s in host.seen for m in s.payload.metrics)

        # online again: births, then the stored rows in order, marked historical
        host.state(True, int(time.time() * 1000))
        await wait_for(lambda: host.node(NODE).devices["plc1"]["temp"].value == 66.5, timeout=20)
        after = host.seen[seen:]
        assert [s.type for s in after[:2]] == ["NBIRTH", "DBIRTH"]
        stored = [m for s in after[2:] if s.type == "DDATA" for m in s.payload.metrics if m.value == 66.5]
        assert stored and all(m.is_historical for m in stored)
        assert sink.stats().published > published
        assert host.problems == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        host.close()


async def test_both_payloads_each_row_reaches_both_sinks_at_their_own_pace(
    broker: Broker, plc: ModbusPeer, tmp_path: Path
) -> None:
    host = SparkplugHost(broker.port, GROUP, host_id="scada-1")
    sub = Subscriber(broker.port, "acme/line-3/telemetry/#")
    cfg = load_config(_config(tmp_path, broker, plc, host="scada-1", payloads="[json, sparkplug]"))
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        outbox = agent.outbox
        assert outbox is not None
        # the primary host is offline: the JSON sink publishes telemetry, the rows stay for the Sparkplug node
        await wait_for(lambda: len(sub.on("/telemetry/plc1")) >= 3 and outbox.depth >= 3, timeout=20)
        assert host.seen == []
        plc.place("holding", 0, _float_registers(77.25))
        await wait_for(
            lambda: any(t["value"] == 77.25 for m in sub.on("/telemetry/plc1") for t in m.json()["tags"]), timeout=10
        )
        # online: births, then every stored row as Sparkplug data, the waiting ones historical
        host.state(True, int(time.time() * 1000))
        await wait_for(lambda: host.node(NODE).devices.get("plc1", {}).get("temp") is not None, timeout=20)
        await wait_for(lambda: host.node(NODE).devices["plc1"]["temp"].value == 77.25, timeout=20)
        stored = [m for s in host.of("DDATA", "plc1") for m in s.payload.metrics if m.value == 77.25]
        assert stored and all(m.is_historical for m in stored)
        # both delivered: the rows are gone from the outbox
        await wait_for(lambda: outbox.depth <= 2, timeout=20)
        assert host.problems == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        host.close()
        sub.close()


async def test_a_reload_that_adds_a_tag_gives_births_with_it(broker: Broker, plc: ModbusPeer, tmp_path: Path) -> None:
    host = SparkplugHost(broker.port, GROUP)
    path = _config(tmp_path, broker, plc)
    agent = Agent(load_config(path), source=path, watch_interval=0)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: host.node(NODE).devices.get("plc1", {}).get("temp") is not None, timeout=20)
        bdseq = host.of("NBIRTH")[0].payload.metric("bdSeq").value
        plc.place("holding", 4, [123])
        path.write_text(
            path.read_text().replace(
                "      - {name: running,",
                '      - {name: extra, address: "40005", type: uint16, unit: bar}\n      - {name: running,',
            )
        )
        assert await agent.reload() == "ok"
        # the node is born again with the new tag (a new connection: the next bdSeq), and it updates
        await wait_for(lambda: "extra" in host.node(NODE).devices["plc1"], timeout=20)
        await wait_for(lambda: host.node(NODE).devices["plc1"]["extra"].value == 123, timeout=20)
        assert host.node(NODE).devices["plc1"]["extra"].unit == "bar"
        assert host.of("NBIRTH")[-1].payload.metric("bdSeq").value == (bdseq + 1) % 256
        assert host.problems == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        host.close()


def _stored_values(outbox: Path, tag: str) -> list[object]:
    """The values of `tag` in the telemetry rows the outbox file holds, in row order (read-only, beside the agent)."""
    with contextlib.closing(sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT payload FROM messages WHERE kind = ? ORDER BY id", (int(Kind.TELEMETRY),))
        return [t.get("value") for (p,) in rows for t in json.loads(p)["tags"] if t.get("name") == tag]


@contextlib.asynccontextmanager
async def _running(agent: Agent) -> AsyncIterator[Agent]:
    """Run an in-process agent for the block; stop it (NDEATH, clean disconnect) on the way out."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_broker_killed_and_restarted_store_and_forward(broker: Broker, plc: ModbusPeer, tmp_path: Path) -> None:
    """The broker dies (SIGKILL) while a counter steps: after its restart on the same port, the node's NBIRTH
    (the next bdSeq, seq 0), its DBIRTH, then every outage value as historical DDATA, in order, none lost."""
    host = SparkplugHost(broker.port, GROUP, host_id="scada-1")
    host.client.reconnect_delay_set(0.1, 0.5)  # the host comes back soon after the broker does
    cfg = load_config(_config(tmp_path, broker, plc, host="scada-1"))
    try:
        async with _running(Agent(cfg)) as agent:
            sink, outbox = agent.sink, agent.outbox
            assert sink is not None and outbox is not None
            host.state(True, int(time.time() * 1000))
            await wait_for(lambda: host.node(NODE).devices.get("plc1", {}).get("speed") is not None, timeout=20)
            await wait_for(lambda: host.node(NODE).devices["plc1"]["speed"].value == -7, timeout=10)
            bdseq = host.of("NBIRTH")[0].payload.metric("bdSeq").value

            # the broker dies with no goodbye: nothing saved, no retained STATE after it comes back
            await asyncio.to_thread(broker.kill)
            await wait_for(lambda: not sink.connected, timeout=10)
            mark = len(host.seen)
            steps = list(range(100, 110))
            for value in steps:  # a counter stepped on the PLC; each step waits until a telemetry row holds it
                plc.place("holding", 2, [value])

                async def stored(value: int = value) -> bool:
                    await outbox.flush()
                    return value in await asyncio.to_thread(_stored_values, cfg.outbox.path, "speed")

                await wait_for(stored, timeout=10, what=f"a telemetry row with speed {value}")
            assert not sink.connected and len(host.seen) == mark

            # back on the same port: the node connects but waits for the primary host, who subscribes first
            await asyncio.to_thread(broker.start)
            await wait_for(lambda: sink.connected and host.connects == 2, timeout=30)
            await asyncio.sleep(0.3)  # a node that did not wait would have sent its births by now (checked below too)
            assert len(host.seen) == mark
            host.state(True, int(time.time() * 1000))
            await wait_for(lambda: host.node(NODE).devices["plc1"]["speed"].value == steps[-1], timeout=20)

            after = host.seen[mark:]
            # the old session's NDEATH: a killed mosquitto loses the will; had one come, it carries the old bdSeq
            deaths = [s for s in after if s.type == "NDEATH"]
            assert all(s.payload.metric("bdSeq").value == bdseq for s in deaths)
            session = [s for s in after if s.type != "NDEATH"]
            assert [s.type for s in session[:2]] == ["NBIRTH", "DBIRTH"] and session[1].device == "plc1"
            nbirth = session[0].payload
            assert nbirth.metric("bdSeq").value == (bdseq + 1) % 256  # a new connection: the next bdSeq (3.0)
            assert [s.payload.seq for s in session] == [i % 256 for i in range(len(session))]  # from 0, no gap
            aliases = {m.alias for s in session[:2] for m in s.payload.metrics if m.alias is not None}
            data = [s for s in session[2:] if s.type == "DDATA" and s.device == "plc1"]
            assert all(m.alias in aliases for s in data for m in s.payload.metrics)
            speed = next(m.alias for m in session[1].payload.metrics if m.name == "speed")
            values = [m for s in data for m in s.payload.metrics if m.alias == speed]
            assert [m.value for m in values] == steps  # every outage value, once, in the order it was made
            assert all(m.is_historical for m in values)
            stamps = [m.timestamp or 0 for m in values]
            assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
            assert sink.stats().connects == 2
            assert host.problems == []

        # out of the block: the agent stopped cleanly; its NDEATH carries the new session's bdSeq
        await wait_for(lambda: len(host.of("NDEATH")) == len(deaths) + 1, timeout=10)
        assert host.of("NDEATH")[-1].payload.metric("bdSeq").value == (bdseq + 1) % 256
    finally:
        host.close()
