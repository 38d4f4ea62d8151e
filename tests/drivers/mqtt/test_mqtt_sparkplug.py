"""Sparkplug B into the MQTT input driver, against mosquitto and a node encoded by tests/sparkplug_wire.py.

Births define names, aliases and types; DDATA by alias is honoured; a late-joining driver asks the node for a
rebirth (NCMD) and gets its values; NDEATH (the will of a SIGKILLed node) and DDEATH make the tags
comms-lost, the next birth good again; a seq gap asks for a rebirth; garbage is counted and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import pytest
from helpers import Broker, wait_for
from mqttin_peer import device_yaml, running
from spnode import SparkplugNode

from edge_agent.types import Quality

SPNODE = Path(__file__).with_name("spnode.py")
TAGS = """\
    sparkplug: {group_id: plant-a, edge_node_id: line-3, device_id: plc-1, rebirth_interval: 1s}
    tags:
      - {name: temp, metric: Temperature}
      - {name: pressure, metric: Pressure}
      - {name: offset, metric: Offset}
      - {name: running, metric: Running}
      - {name: mode, metric: Mode}
      - {name: counter, metric: Counter}
"""


def _config(broker: Broker, extra: str = "") -> str:
    return device_yaml(broker.url, extra + TAGS)


async def test_births_and_data_by_alias(broker: Broker) -> None:
    """Every birth value arrives with its type; DDATA by alias updates the named tag only."""
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        async with running(_config(broker)) as (driver, got):
            node.birth()
            await wait_for(got.has("counter", 2**60 + 1), timeout=5, what="the DBIRTH values")
            assert got.latest == {
                "temp": (20.5, Quality.GOOD),
                "pressure": (1.25, Quality.GOOD),
                "offset": (-2, Quality.GOOD),  # Int16, sign-extended to 32 bits on the wire
                "running": (True, Quality.GOOD),
                "mode": ("auto", Quality.GOOD),
                "counter": (2**60 + 1, Quality.GOOD),  # beyond float64's integers: kept exact
            }
            n_before = len(got.batches)
            node.data({"Temperature": 21.75, "Offset": -300})
            await wait_for(got.has("offset", -300), timeout=5, what="DDATA by alias")
            assert got.value("temp") == 21.75
            assert {s.tag for b in got.batches[n_before:] for s in b.samples()} == {"temp", "offset"}
            assert driver.counters.rebirths == 0 and driver.counters.untrusted == 0
            assert driver.counters.malformed == 0
    finally:
        node.close()


async def test_a_late_joiner_asks_for_a_rebirth(broker: Broker) -> None:
    """Data by alias from a node born before the driver subscribed: NCMD Rebirth, then births, then values."""
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        node.birth()  # nobody listens yet: births are not retained
        async with running(_config(broker)) as (driver, got):
            node.data({"Temperature": 30.0})
            await wait_for(lambda: node.rebirths >= 1, timeout=5, what="a rebirth request at the node")
            await wait_for(got.has("temp", 30.0), timeout=5, what="the values of the rebirth")
            assert got.value("mode") == "auto"
            assert driver.counters.rebirths == 1
            node.data({"Temperature": 31.0})
            await wait_for(got.has("temp", 31.0), timeout=5)
            assert driver.counters.rebirths == 1  # born now: no further request
    finally:
        node.close()


async def test_no_rebirth_request_when_turned_off(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """request_rebirth: false never publishes NCMD; it says once that it waits for the next birth."""
    cfg = _config(broker).replace("rebirth_interval: 1s", "rebirth_interval: 1s, request_rebirth: false")
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        node.birth()
        async with running(cfg) as (driver, got):
            for v in (1.0, 2.0, 3.0):
                node.data({"Temperature": v})
            await wait_for(lambda: driver.counters.received >= 3, timeout=5)
            assert driver.counters.rebirths == 0 and node.rebirths == 0
            assert got.value("temp") is None  # aliases no birth defined: nothing trusted
            assert sum("request_rebirth is off" in r.message for r in caplog.records) == 1
            node.birth()  # the node's own next birth
            await wait_for(got.has("temp", 3.0), timeout=5)
    finally:
        node.close()


async def test_device_death_and_birth(broker: Broker) -> None:
    """DDEATH: every tag comms-lost; DBIRTH after it: good again."""
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        async with running(_config(broker)) as (_, got):
            node.birth()
            await wait_for(got.has("temp", 20.5), timeout=5)
            node.device_death()
            await wait_for(lambda: got.quality("mode") == Quality.COMMS_LOST, timeout=5, what="DDEATH")
            assert {q for _, q in got.latest.values()} == {Quality.COMMS_LOST}
            node.values["Temperature"] = 19.0
            node.birth()
            await wait_for(got.has("temp", 19.0), timeout=5, what="the DBIRTH after the death")
    finally:
        node.close()


async def test_a_killed_node_goes_comms_lost_by_its_will(broker: Broker) -> None:
    """SIGKILL the node's process: the broker sends its NDEATH will; the next node session births again."""
    async with running(_config(broker, "    stale_after: 1h\n")) as (driver, got):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SPNODE), str(broker.port), "plant-a", "line-3", "plc-1", "7", stdout=PIPE
        )
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"born"
            await wait_for(lambda: got.quality("temp") == Quality.GOOD, timeout=5, what="the node's births")
            await wait_for(lambda: driver.counters.received >= 5, timeout=5, what="DDATA")
            proc.kill()
            await proc.wait()
            # mosquitto sends the will when it notices the dead socket (at once: the kernel closes it)
            await wait_for(lambda: got.quality("temp") == Quality.COMMS_LOST, timeout=15, what="the NDEATH will")
            assert {q for _, q in got.latest.values()} == {Quality.COMMS_LOST}
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1", bdseq=8)
        try:
            node.birth()
            await wait_for(got.has("temp", 20.5), timeout=5, what="the new session's births")
        finally:
            node.close(death=False)


async def test_a_late_will_of_an_old_session_is_ignored(broker: Broker) -> None:
    """An NDEATH whose bdSeq is not the current birth's belongs to a session that ended before: no effect."""
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1", bdseq=5)
    try:
        async with running(_config(broker)) as (driver, got):
            node.birth()
            await wait_for(got.has("temp", 20.5), timeout=5)
            node.bdseq = 4  # the previous session's will
            node.close()
            received = driver.counters.received
            await wait_for(lambda: driver.counters.received > received, timeout=5, what="the old NDEATH")
            assert got.quality("temp") == Quality.GOOD
    finally:
        node.client.loop_stop()


async def test_seq_gap_asks_for_a_rebirth(broker: Broker) -> None:
    """A lost message (seq jumps) is counted and answered by a rebirth request."""
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        async with running(_config(broker)) as (driver, got):
            node.birth()
            await wait_for(got.has("temp", 20.5), timeout=5)
            node.skip_seq()
            node.data({"Temperature": 22.0})
            await wait_for(lambda: node.rebirths == 1, timeout=5, what="the rebirth request after a gap")
            assert driver.counters.untrusted >= 1
            await wait_for(got.has("temp", 22.0), timeout=5)
    finally:
        node.close()


async def test_garbage_is_counted_and_logged_once(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Payloads that are not protobuf, or not on a Sparkplug topic shape, never stop the driver."""
    caplog.set_level(logging.DEBUG, "edge_agent.drivers.mqtt")
    node = SparkplugNode(broker.port, "plant-a", "line-3", "plc-1")
    try:
        async with running(_config(broker)) as (driver, got):
            node.birth()
            await wait_for(got.has("temp", 20.5), timeout=5)
            for _ in range(5):
                node.publish(node.topic("DDATA", True), b"\xff\xff\xff")  # a truncated varint: no protobuf
            node.publish("spBv1.0/plant-a/NOPE/line-3", b"")
            node.data({"Temperature": 23.0})
            await wait_for(got.has("temp", 23.0), timeout=5, what="good data after the garbage")
            assert driver.counters.malformed == 6
            warned = [r for r in caplog.records if r.levelno == logging.WARNING and "logged once" in r.message]
            assert len(warned) == 2  # one per topic
    finally:
        node.close()
