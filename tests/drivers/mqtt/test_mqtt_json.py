"""JSON into the MQTT input driver, against mosquitto: paths and types, malformed payloads, staleness, a flood,
and a lost broker seen through the poller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from typing import Any

import paho.mqtt.client as paho
import pytest
from helpers import Broker, block_until, wait_for
from mqttin_peer import Collected, device_yaml, running
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import parse_config
from edge_agent.drivers import REGISTRY
from edge_agent.poller import DevicePoller
from edge_agent.types import Quality

TAGS = """\
    tags:
      - {name: flow, topic: plant/line-3/flow, path: $.value, unit: m3/h}
      - {name: count, topic: plant/line-3/counts, path: "$.tags[name=good].v", type: int}
      - {name: running, topic: plant/line-3/state, path: $.run, type: bool}
      - {name: mode, topic: plant/line-3/state, path: $.mode, type: str}
      - {name: bare, topic: plant/line-3/bare}
"""


class Publisher:
    """A plain paho client publishing at QoS 1 and waiting for each PUBACK."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, user: tuple[str, str] | None = None) -> None:
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        if tls is not None:
            self.client.tls_set_context(tls)
        if user is not None:
            self.client.username_pw_set(*user)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def send(self, topic: str, payload: Any, *, retain: bool = False, qos: int = 1) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def pub(broker: Broker) -> Any:
    p = Publisher(broker.port)
    yield p
    p.close()


async def test_paths_types_and_retained_values(broker: Broker, pub: Publisher) -> None:
    """A retained value arrives on subscribing; each path finds its value, typed; two tags share a topic."""
    pub.send("plant/line-3/flow", {"value": 40.25, "ts": 1}, retain=True)
    async with running(device_yaml(broker.url, TAGS)) as (driver, got):
        await wait_for(got.has("flow", 40.25), timeout=5, what="the retained value")
        pub.send("plant/line-3/counts", {"tags": [{"name": "bad", "v": 1}, {"name": "good", "v": 97}]})
        pub.send("plant/line-3/state", {"run": True, "mode": "auto"})
        pub.send("plant/line-3/bare", 7)
        await wait_for(got.has("bare", 7.0), timeout=5)
        await wait_for(got.has("mode", "auto"), timeout=5)
        assert got.latest["count"] == (97, Quality.GOOD) and isinstance(got.value("count"), int)
        assert got.latest["running"] == (True, Quality.GOOD)
        assert driver.counters.malformed == 0


async def test_malformed_payloads_are_counted_logged_once_and_never_stop_it(
    broker: Broker, pub: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """Not JSON, a path that finds nothing, a value of the wrong type: the tag goes bad, later values are good."""
    caplog.set_level(logging.DEBUG, "edge_agent.drivers.mqtt")
    async with running(device_yaml(broker.url, TAGS)) as (driver, got):
        for _ in range(3):
            pub.send("plant/line-3/flow", b"{not json")
        await wait_for(lambda: got.quality("flow") == Quality.BAD, timeout=5)
        pub.send("plant/line-3/counts", {"tags": [{"name": "bad", "v": 1}]})  # no element named good
        pub.send("plant/line-3/state", {"run": "yes", "mode": "auto"})  # run is not a bool
        await wait_for(got.has("mode", "auto"), timeout=5)
        assert got.quality("count") == Quality.BAD and got.quality("running") == Quality.BAD
        assert driver.counters.malformed == 5
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 3, warnings  # once per topic (and path), not once per message
        assert any("not bool" in w for w in warnings) and any("no element matches" in w for w in warnings)
        pub.send("plant/line-3/flow", {"value": 1.5})
        await wait_for(got.has("flow", 1.5), timeout=5, what="a good value after the garbage")


async def test_a_silent_tag_goes_stale_and_back(broker: Broker, pub: Publisher) -> None:
    """stale_after: no update for that long makes the tag stale; the next message makes it good again."""
    cfg = device_yaml(broker.url, "    poll_interval: 100ms\n    stale_after: 300ms\n" + TAGS)
    async with running(cfg) as (driver, got):
        pub.send("plant/line-3/flow", {"value": 3.0})
        await wait_for(got.has("flow", 3.0), timeout=5)
        await wait_for(lambda: got.quality("flow") == Quality.STALE, timeout=5, what="the tag going stale")
        assert got.quality("bare") == Quality.STALE  # never received at all: stale too
        pub.send("plant/line-3/flow", {"value": 4.0})
        await wait_for(got.has("flow", 4.0), timeout=5)
        assert driver.counters.stale >= 2


async def test_a_flood_stays_within_max_queued(broker: Broker, pub: Publisher) -> None:
    """While the event loop is busy, at most max_queued messages wait; the oldest are dropped and counted,
    and the newest value is the one the tag ends with."""
    cfg = device_yaml(broker.url, "    max_queued: 50\n" + TAGS)
    async with running(cfg) as (driver, got):
        total = 2000
        # the loop is blocked here (block_until is synchronous): paho's thread alone receives
        for i in range(total):
            pub.send("plant/line-3/flow", {"value": float(i)}, qos=0)
        pub.send("plant/line-3/flow", {"value": float(total)})  # QoS 1: the broker has sent everything before
        block_until(lambda: driver.counters.dropped + len(driver._queue) >= total + 1, 20, "the flood to arrive")
        assert len(driver._queue) <= 50
        await wait_for(got.has("flow", float(total)), timeout=10, what="the newest value")
        assert driver.counters.received + driver.counters.dropped == total + 1
        assert driver.counters.dropped >= total + 1 - 50


async def test_a_lost_broker_makes_the_tags_comms_lost_until_it_is_back(broker: Broker, pub: Publisher) -> None:
    """Through the poller: the broker killed, every tag comms-lost; restarted, values flow again."""
    cfg = parse_config(
        device_yaml(
            broker.url,
            "    keepalive: 1s\n    timeout: 500ms\n    backoff: {initial: 50ms, max: 200ms}\n" + TAGS,
        )
    )
    got = Collected()
    poller = DevicePoller(cfg.devices[0], REGISTRY["mqtt"].build(cfg.devices[0]), got)
    task = asyncio.create_task(poller.run())
    try:
        await wait_for(lambda: poller.stats().connected, timeout=5, what="the first connection")
        pub.send("plant/line-3/flow", {"value": 1.0})
        await wait_for(got.has("flow", 1.0), timeout=5)
        pub.close()
        broker.kill()
        await wait_for(lambda: got.quality("flow") == Quality.COMMS_LOST, timeout=10, what="comms-lost")
        assert {q for _, q in got.latest.values()} == {Quality.COMMS_LOST}
        broker.start()
        await wait_for(lambda: poller.stats().connected, timeout=10, what="the reconnection")
        again = Publisher(broker.port)
        try:
            again.send("plant/line-3/flow", {"value": 2.0})
            await wait_for(got.has("flow", 2.0), timeout=5, what="values after the outage")
        finally:
            again.close()
        assert poller.stats().failures >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_refused_connection_says_why(broker: Broker) -> None:
    """Nothing listening: DeviceError names the broker; the driver can be closed after it."""
    from edge_agent.errors import DeviceError

    broker.stop()
    device = parse_config(device_yaml(broker.url, "    timeout: 1s\n" + TAGS)).devices[0]
    driver = REGISTRY["mqtt"].build(device)
    with pytest.raises(DeviceError, match=f"MQTT broker 127.0.0.1:{broker.port} is unreachable"):
        await driver.connect()
    await driver.close()
