"""The agent polling a real snap7 server through a PLC that is down at startup, and a PLC restart."""

from __future__ import annotations

import asyncio
import struct

from helpers import free_port, wait_for
from helpers import latest_value as value
from s7peer import S7Peer

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.types import Quality


def config(port: int) -> str:
    return (
        "devices:\n"
        f"  - name: plc\n    type: s7\n    host: 127.0.0.1\n    port: {port}\n"
        "    poll_interval: 50ms\n    timeout: 300ms\n    on_startup_error: retry\n"
        "    backoff: {initial: 50ms, max: 200ms}\n"
        "    tags:\n"
        "      - {name: plc.v, address: DB1.DBD0, type: real}\n"
        "      - {name: plc.run, address: Q0.0}\n"
    )


async def test_plc_down_at_startup_comes_back_by_itself() -> None:
    peer = S7Peer()
    peer.db[1][0:4] = struct.pack(">f", 7.5)
    peer.q[0] = 1
    port = free_port()
    agent = Agent(parse_config(config(port)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        # down from the start: the tags are there, marked comms-lost, until the PLC answers
        await wait_for(lambda: agent.stats().devices[0].failures >= 1 and value(agent, "plc.v") is not None, timeout=20)
        down = value(agent, "plc.v")
        assert down is not None and down[1] is Quality.COMMS_LOST and agent.stats().devices[0].failures >= 1
        await peer.start(port)
        await wait_for(lambda: value(agent, "plc.v") == (7.5, Quality.GOOD))
        assert value(agent, "plc.run") == (1.0, Quality.GOOD)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await peer.stop()


async def test_plc_restart_mid_run(s7_peer: S7Peer) -> None:
    s7_peer.db[1][0:4] = struct.pack(">f", 11.0)
    agent = Agent(parse_config(config(s7_peer.port)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "plc.v") == (11.0, Quality.GOOD))
        await s7_peer.stop()
        await wait_for(lambda: (value(agent, "plc.v") or (0.0, Quality.GOOD))[1] is Quality.COMMS_LOST)
        assert not agent.stats().devices[0].connected
        # several failed reconnects while down
        await wait_for(lambda: agent.stats().devices[0].failures >= 2, timeout=20, what="2 failed reconnects")
        s7_peer.db[1][0:4] = struct.pack(">f", 22.0)
        await s7_peer.start()
        await wait_for(lambda: value(agent, "plc.v") == (22.0, Quality.GOOD))
        assert agent.stats().devices[0].connected and agent.stats().devices[0].failures >= 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
