"""The agent polling real pymodbus servers through outages, restarts and startup failures."""

from __future__ import annotations

import asyncio

import pytest
from peers import ModbusPeer, free_port, wait_for
from peers import latest_value as value

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.errors import DeviceStartupError
from edge_agent.types import Quality


def config(*devices: tuple[str, int, str]) -> str:
    out = "devices:\n"
    for name, port, policy in devices:
        out += (
            f"  - name: {name}\n    type: modbus\n    host: 127.0.0.1\n    port: {port}\n"
            f"    poll_interval: 50ms\n    timeout: 300ms\n    on_startup_error: {policy}\n"
            f"    backoff: {{initial: 50ms, max: 200ms}}\n"
            f'    tags:\n      - {{name: {name}.v, address: "40001"}}\n'
        )
    return out


async def test_server_restart_mid_run(modbus_peer: ModbusPeer) -> None:
    modbus_peer.holding[0] = 11
    agent = Agent(parse_config(config(("plc", modbus_peer.port, "retry"))))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "plc.v") == (11.0, Quality.GOOD))
        await modbus_peer.stop()
        await wait_for(lambda: (value(agent, "plc.v") or (0.0, Quality.GOOD))[1] is Quality.COMMS_LOST)
        poller = agent.pollers[0]
        assert not poller.stats.connected
        await asyncio.sleep(0.4)  # several failed reconnects while down
        modbus_peer.holding[0] = 22
        await modbus_peer.start()
        await wait_for(lambda: value(agent, "plc.v") == (22.0, Quality.GOOD))
        assert poller.stats.connected and poller.stats.failures >= 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_device_down_at_startup_comes_back_by_itself() -> None:
    peer = ModbusPeer()
    port = free_port()
    peer.holding[0] = 7
    agent = Agent(parse_config(config(("late", port, "retry"))))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.sleep(0.4)
        assert value(agent, "late.v") is None and agent.pollers[0].stats.failures >= 1
        await peer.start(port)
        await wait_for(lambda: value(agent, "late.v") == (7.0, Quality.GOOD))
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await peer.stop()


async def test_failing_device_does_not_stop_the_others(modbus_peer: ModbusPeer) -> None:
    modbus_peer.holding[0] = 5
    agent = Agent(
        parse_config(
            config(
                ("good", modbus_peer.port, "retry"), ("gone", free_port(), "ignore"), ("flaky", free_port(), "retry")
            )
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "good.v") == (5.0, Quality.GOOD))
        reads = agent.pollers[0].stats.reads
        await asyncio.sleep(0.3)
        assert agent.pollers[0].stats.reads >= reads + 3
        assert value(agent, "gone.v") is None and value(agent, "flaky.v") is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_on_startup_error_error_stops_the_agent() -> None:
    agent = Agent(parse_config(config(("strict", free_port(), "error"))))
    with pytest.raises(ExceptionGroup) as err:
        await asyncio.wait_for(agent.run(asyncio.Event()), 5)
    assert err.group_contains(DeviceStartupError)


async def test_wrong_unit_marks_tags_bad_but_device_up(modbus_peer: ModbusPeer) -> None:
    text = config(("plc", modbus_peer.port, "retry")).replace("on_startup_error", "unit: 9\n    on_startup_error")
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "plc.v") is not None)
        assert value(agent, "plc.v")[1] is Quality.BAD  # type: ignore[index]
        assert agent.pollers[0].stats.connected
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_stop_is_prompt_in_the_middle_of_a_long_group(modbus_peer: ModbusPeer) -> None:
    # one request per tag: a stop nearly always lands while a reply is on its way, where Python 3.11's
    # wait_for (inside pymodbus) may swallow the cancellation; the agent must stop anyway
    tags = "".join(f'      - {{name: t{i}, address: "holding:{i}"}}\n' for i in range(400))
    text = (
        f"devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n    port: {modbus_peer.port}\n"
        f"    poll_interval: 50ms\n    planner: {{mode: none}}\n    tags:\n{tags}"
    )
    agent = Agent(parse_config(text))
    for _ in range(3):
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await wait_for(lambda: agent.pollers[0].stats.reads >= 1)
        await asyncio.sleep(0.13)
        stop.set()
        await asyncio.wait_for(task, 3)  # a swallowed cancellation would hang here
