"""Server restarts (with shifted namespace indexes), dropped connections and 100 reconnects without leaks."""

from __future__ import annotations

import asyncio
import math
import os

import pytest
from asyncua.server.internal_session import InternalSession
from helpers import wait_for
from opcua_peer import NS, UaPeer, device_yaml

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.errors import DeviceError
from edge_agent.types import Quality, SampleBatch

pytestmark = pytest.mark.asyncio(loop_scope="session")


def latest(agent: Agent, tag: str) -> tuple[float, Quality] | None:
    got = agent.latest(tag)
    if got is None:
        return None
    return (math.nan if math.isnan(got[1]) else got[1], got[2])


async def test_restart_with_shifted_namespaces(own_peer: UaPeer) -> None:
    assert own_peer.idx == 2
    text = device_yaml(own_peer.url, [("p.level", f"nsu={NS};s=Level"), ("p.by_index", "ns=2;s=Level")], name="polled")
    text += device_yaml(own_peer.url, [("s.level", f"nsu={NS};s=Level")], name="pushed", mode="subscribe").replace(
        "devices:\n", ""
    )
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await own_peer.write("Level", 21.0)
        await wait_for(lambda: latest(agent, "p.level") == latest(agent, "s.level") == (21.0, Quality.GOOD))
        await own_peer.stop()
        await wait_for(lambda: all(latest(agent, t) == (math.nan, Quality.COMMS_LOST) for t in ("p.level", "s.level")))
        assert not any(d.connected for d in agent.stats().devices)
        # the server comes back with two more namespaces ahead of ours: our index is now 4
        await own_peer.start(extra_namespaces=["urn:vendor:a", "urn:vendor:b"])
        assert own_peer.idx == 4
        await own_peer.write("Level", 22.0)
        await wait_for(lambda: latest(agent, "p.level") == latest(agent, "s.level") == (22.0, Quality.GOOD))
        assert all(d.connected for d in agent.stats().devices)
        # a node id by index now names a node that does not exist: bad, and the device stays up
        assert latest(agent, "p.by_index") == (math.nan, Quality.BAD)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


@pytest.mark.parametrize("mode", ["read", "subscribe"])
async def test_dropped_connection_recovers(ua_peer: UaPeer, mode: str) -> None:
    tags = [("d.level", f"nsu={NS};s=Level")]
    agent = Agent(parse_config(device_yaml(ua_peer.url, tags, mode=mode, interval="50ms")))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await ua_peer.write("Level", 31.0)
        await wait_for(lambda: latest(agent, "d.level") == (31.0, Quality.GOOD))
        failures = agent.stats().devices[0].failures
        ua_peer.drop_connections()
        await wait_for(lambda: agent.stats().devices[0].failures > failures)
        await ua_peer.write("Level", 32.0)
        # in subscribe mode the first data change can land while the reconnect is still creating the
        # subscription, a moment before the poller marks itself connected: wait for both
        await wait_for(lambda: latest(agent, "d.level") == (32.0, Quality.GOOD) and agent.stats().devices[0].connected)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await ua_peer.write("Level", 10.0)


def client_tasks() -> int:
    """Tasks of this process that are not the in-process server's (its sessions time out on their own)."""
    return sum("asyncua/server" not in t.get_coro().cr_code.co_filename for t in asyncio.all_tasks())  # type: ignore[union-attr]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_100_reconnects_leak_no_task_socket_or_session(ua_peer: UaPeer) -> None:
    tags = [("k.level", f"nsu={NS};s=Level"), ("k.double", f"nsu={NS};s=Double")]
    driver = OpcUaDriver(parse_config(device_yaml(ua_peer.url, tags, mode="subscribe", interval="50ms")).devices[0])  # type: ignore[arg-type]
    got: list[SampleBatch] = []

    async def cycle(i: int) -> None:
        await driver.connect()
        await driver.subscribe(got.append)
        await driver.read(driver.subscriptions[0])
        await driver.check()
        if i % 2:  # every other time the connection dies under the driver, as in a network outage
            ua_peer.drop_connections()
            with pytest.raises(DeviceError):
                async with asyncio.timeout(3):
                    while True:
                        await driver.check()
                        await asyncio.sleep(0.01)
        await driver.close()

    await cycle(0)  # warm-up: first-use allocations and the executor's thread
    await asyncio.sleep(0.1)
    tasks, fds, sessions = client_tasks(), open_fds(), InternalSession._current_connections
    for i in range(100):
        await cycle(i)
    # let cancelled tasks and closed transports finish
    await wait_for(lambda: client_tasks() == tasks and open_fds() <= fds, timeout=20, what="tasks and fds to settle")
    assert client_tasks() == tasks
    assert open_fds() <= fds
    # politely closed sessions are gone at once; the 50 cut ones wait for the session timeout on the server
    assert InternalSession._current_connections <= sessions + 50
    assert got  # the subscriptions delivered each time
