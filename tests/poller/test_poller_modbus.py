"""The agent polling real pymodbus servers through outages, restarts and startup failures."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from helpers import ModbusPeer, free_port, wait_for
from helpers import latest_value as value
from pymodbus.constants import ExcCodes

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.errors import DeviceStartupError
from edge_agent.poller import DevicePoller
from edge_agent.types import Quality, SampleBatch


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


def lost(got: tuple[float, Quality] | None) -> bool:
    """A tag's newest sample says the device could not be reached."""
    return got is not None and math.isnan(got[0]) and got[1] is Quality.COMMS_LOST


def poller_lines(caplog: pytest.LogCaptureFixture, logger: str = "edge_agent.poller") -> list[tuple[int, str]]:
    """(level, message) of a logger's records at INFO and above."""
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == logger and r.levelno >= logging.INFO]


async def test_server_restart_mid_run(modbus_peer: ModbusPeer, caplog: pytest.LogCaptureFixture) -> None:
    """The device comes back by itself, with one line when it fails and one when it recovers."""
    caplog.set_level(logging.INFO)
    modbus_peer.holding[0] = 11
    agent = Agent(parse_config(config(("plc", modbus_peer.port, "retry"))))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "plc.v") == (11.0, Quality.GOOD))
        await modbus_peer.stop()
        await wait_for(lambda: lost(value(agent, "plc.v")))
        assert not agent.stats().devices[0].connected
        # several failed reconnects while down
        await wait_for(lambda: agent.stats().devices[0].failures >= 3, timeout=20, what="3 failed reconnects")
        assert agent.stats().devices[0].failures >= 3
        modbus_peer.holding[0] = 22
        await modbus_peer.start()
        await wait_for(lambda: value(agent, "plc.v") == (22.0, Quality.GOOD))
        assert agent.stats().devices[0].connected
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    lines = poller_lines(caplog)
    assert [lvl for lvl, _ in lines] == [logging.INFO, logging.WARNING, logging.INFO], lines
    assert lines[0][1] == "device plc: connected"
    assert "the device closed the connection" in lines[1][1]  # the cause, not just "not connected"
    assert lines[2][1].startswith("device plc: back after ")


async def test_device_down_at_startup_comes_back_by_itself() -> None:
    peer = ModbusPeer()
    port = free_port()
    peer.holding[0] = 7
    agent = Agent(parse_config(config(("late", port, "retry"))))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        # consumers see the tag as unreachable from the start, not merely absent
        await wait_for(lambda: agent.stats().devices[0].failures >= 1 and lost(value(agent, "late.v")), timeout=20)
        assert lost(value(agent, "late.v")) and agent.stats().devices[0].failures >= 1
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
        reads = agent.stats().devices[0].reads
        await wait_for(lambda: agent.stats().devices[0].reads >= reads + 3, timeout=20, what="3 more reads")
        assert agent.stats().devices[0].reads >= reads + 3
        assert lost(value(agent, "gone.v")) and lost(value(agent, "flaky.v"))
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_on_startup_error_error_stops_the_agent() -> None:
    agent = Agent(parse_config(config(("strict", free_port(), "error"))))
    with pytest.raises(ExceptionGroup) as err:
        await asyncio.wait_for(agent.run(asyncio.Event()), 5)
    assert err.group_contains(DeviceStartupError)


async def test_wrong_unit_marks_tags_bad_but_device_up(
    modbus_peer: ModbusPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    text = config(("plc", modbus_peer.port, "retry")).replace("on_startup_error", "unit: 9\n    on_startup_error")
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: agent.stats().devices[0].reads >= 5)
        assert value(agent, "plc.v")[1] is Quality.BAD  # type: ignore[index]
        assert agent.stats().devices[0].connected
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    # pymodbus answers a unit it does not serve with exception 4: one line for the device, not one per scan
    assert poller_lines(caplog, "edge_agent.drivers.modbus") == [
        (
            logging.WARNING,
            "device plc: no request of the 0.05s scan answered with data "
            "(40001 answered exception code 4 (server device failure)); 1 tag marked bad until it does "
            "(if the device is on, check its unit id, now 9: a unit that is not there is answered so)",
        )
    ]


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
        await wait_for(lambda: agent.stats().devices[0].reads >= 1)
        await asyncio.sleep(0.13)
        stop.set()
        await asyncio.wait_for(task, 3)  # a swallowed cancellation would hang here


class BlackHole:
    """A listener that accepts TCP connections and never answers (a gateway whose serial device is dead)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        await reader.read()  # swallow requests until the client hangs up

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()


async def test_black_hole_is_one_outage_with_growing_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    hole = BlackHole()
    port = await hole.start()
    text = config(("gw", port, "retry")).replace("max: 200ms", "max: 1s").replace("timeout: 300ms", "timeout: 200ms")
    cfg = parse_config(text).devices[0]
    batches: list[SampleBatch] = []
    poller = DevicePoller(cfg, ModbusDriver(cfg), batches.append)  # type: ignore[arg-type]
    task = asyncio.create_task(poller.run())
    attempts: list[int] = []
    try:
        for _ in range(30):  # 3 s: connects succeed, every read times out
            await asyncio.sleep(0.1)
            attempts.append(poller.stats().attempts)
            assert not poller.stats().connected  # an accepted connection is not a device that is up
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await hole.stop()
    lines = poller_lines(caplog)
    assert [lvl for lvl, _ in lines] == [logging.WARNING], lines  # the outage's start; no "back after", no flapping
    assert lines[0][1] == "device gw: 40001: no answer within 0.2s; retrying with backoff up to 1s"
    # the attempts keep counting (no reset on connect), so the delay doubles towards its cap of 1 s
    assert attempts == sorted(attempts) and attempts[-1] >= 3, attempts
    assert 3 <= hole.accepted <= attempts[-1] + 1  # it kept reconnecting, once per attempt
    assert hole.accepted <= 8  # flapping at the initial 50 ms backoff would reconnect ~10 times in 3 s
    assert sum(bool(b.quality[0] == Quality.COMMS_LOST) for b in batches) == 1  # consumers told once
    assert not any(b.quality[0] == Quality.GOOD for b in batches)


async def test_every_request_refused_is_one_device_level_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    peer = ModbusPeer()
    peer.holding[0] = 3
    await peer.start()
    # three requests per scan: two holding ranges far apart, and a coil
    text = config(("gw", peer.port, "retry")).replace(
        "    tags:\n", '    tags:\n      - {name: far, address: "40501"}\n      - {name: run, address: "00001"}\n'
    )
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: value(agent, "gw.v") == (3.0, Quality.GOOD))
        peer.refuse = ExcCodes.GATEWAY_NO_RESPONSE  # the serial device behind the gateway died
        bad = ("gw.v", "far", "run")
        await wait_for(lambda: all((value(agent, t) or (0, Quality.GOOD))[1] is Quality.BAD for t in bad))
        scans = agent.stats().devices[0].reads
        await wait_for(lambda: agent.stats().devices[0].reads >= scans + 5)  # still failing, still one line
        peer.refuse = None
        await wait_for(lambda: value(agent, "gw.v") == (3.0, Quality.GOOD))
        assert agent.stats().devices[0].connected and agent.stats().devices[0].failures == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await peer.stop()
    lines = poller_lines(caplog, "edge_agent.drivers.modbus")
    assert [lvl for lvl, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert lines[0][1] == (
        "device gw: no request of the 0.05s scan answered with data (3 requests answered exception code 11 "
        "(gateway target device failed to respond)); 3 tags marked bad until it does "
        "(if the device is on, check its unit id, now 1: a unit that is not there is answered so)"
    )
    assert lines[1][1] == "device gw: the 0.05s scan answers with data again"
    assert poller_lines(caplog) == [(logging.INFO, "device gw: connected")]  # the connection never failed
