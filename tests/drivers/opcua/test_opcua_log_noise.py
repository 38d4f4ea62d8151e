"""What an OPC UA device logs at the default level: no library tracebacks at a server restart, a bad tag once."""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from helpers import wait_for
from opcua_peer import NS, UaPeer, device_yaml

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver
from edge_agent.types import Quality

pytestmark = pytest.mark.asyncio(loop_scope="session")


def client_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the agent's side logged (the in-process server logs under asyncua too, the client under asyncua.client)."""
    return [r for r in caplog.records if r.name.startswith(("asyncua.client", "edge_agent"))]


async def test_a_server_restart_logs_no_library_traceback(own_peer: UaPeer, caplog: pytest.LogCaptureFixture) -> None:
    """asyncua's publish loop logged `Publish iteration crashed` with a traceback at ERROR, twice per restart."""
    # the levels `edge-agent run` sets by default (cli/logs.py): asyncua at WARNING, our own at INFO
    caplog.set_level(logging.WARNING, logger="asyncua")
    caplog.set_level(logging.INFO, logger="edge_agent")  # the last call sets the capturing handler's level too
    text = device_yaml(own_peer.url, [("s.level", f"nsu={NS};s=Level")], mode="subscribe", interval="50ms")
    agent = Agent(parse_config(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    def level() -> tuple[float, Quality] | None:
        got = agent.latest("s.level")
        return None if got is None else (math.nan if math.isnan(got[1]) else got[1], got[2])

    try:
        for value in (21.0, 22.0):  # two restarts, each with the publish loop waiting on the server
            await wait_for(lambda: agent.stats().devices[0].connected, timeout=10)
            await own_peer.write("Level", value)
            await wait_for(lambda v=value: level() == (v, Quality.GOOD), timeout=10)  # type: ignore[misc]
            await asyncio.sleep(0.3)  # a publish request is outstanding at the server
            await own_peer.stop()
            await wait_for(lambda: level() == (math.nan, Quality.COMMS_LOST), timeout=10)
            await asyncio.sleep(1.5)  # asyncua's publish loop retries after 1 s: let it
            await own_peer.start()
        await wait_for(lambda: agent.stats().devices[0].connected, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    records = client_records(caplog)
    shown = [r for r in records if r.levelno >= logging.INFO]
    assert not [r for r in shown if r.exc_info or r.exc_text], [(r.name, r.getMessage()) for r in shown]
    assert not [r for r in shown if r.levelno >= logging.ERROR], [(r.name, r.getMessage()) for r in shown]
    assert all("\n" not in r.getMessage() for r in shown)
    # the outage is still said once per restart, by the poller, and its end
    lost = [r for r in shown if r.name == "edge_agent.poller" and r.levelno == logging.WARNING]
    assert len(lost) == 2, [r.getMessage() for r in lost]
    assert len([r for r in shown if "back after" in r.getMessage()]) == 2


async def test_the_publish_loops_crash_is_one_line_and_its_traceback_at_debug(
    own_peer: UaPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG on, the traceback is there; the line at INFO or above has none."""
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    caplog.set_level(logging.DEBUG, logger="asyncua.client.ua_session")
    driver = OpcUaDriver(
        parse_config(device_yaml(own_peer.url, [("s.level", f"nsu={NS};s=Level")], mode="subscribe")).devices[0]  # type: ignore[arg-type]
    )
    await driver.connect()
    try:
        await driver.subscribe(lambda batch: None)
        await asyncio.sleep(0.3)
        await own_peer.stop()
        await wait_for(
            lambda: any("Publish" in r.getMessage() for r in client_records(caplog) if r.levelno >= logging.INFO),
            timeout=10,
        )
    finally:
        await driver.close()
        await own_peer.start()
    publish = [r for r in client_records(caplog) if "Publish" in r.getMessage()]
    assert [r for r in publish if r.levelno < logging.INFO and r.exc_info]  # the traceback, at DEBUG
    assert not [r for r in publish if r.levelno >= logging.INFO and r.exc_info]
    line = next(r for r in publish if r.levelno >= logging.INFO)
    assert line.levelno in (logging.INFO, logging.WARNING), line.levelname
    assert "device ua" in line.getMessage() and "\n" not in line.getMessage()


@pytest.mark.parametrize("mode", ["read", "subscribe"])
async def test_an_array_tag_is_logged_once_however_its_length_changes(
    ua_peer: UaPeer, caplog_opcua: pytest.LogCaptureFixture, mode: str
) -> None:
    """A node whose array changes length said `is an array of N values` again for every N (31 times in 100 s)."""
    tags = [("a.whole", f"nsu={NS};s=Array"), ("a.level", f"nsu={NS};s=Level")]
    driver = OpcUaDriver(parse_config(device_yaml(ua_peer.url, tags, mode=mode, interval="50ms")).devices[0])  # type: ignore[arg-type]
    seen: list[Quality] = []

    def sink(batch: object) -> None:
        seen.extend(s.quality for s in batch.samples() if s.tag == "a.whole")  # type: ignore[attr-defined]

    async def show(value: object) -> None:
        """The server's array becomes `value`; the driver sees it (a read, or a data change)."""
        before = len(seen)
        await ua_peer.write("Array", value)
        if mode == "read":
            sink(await driver.read(driver.groups[0]))
        else:
            await wait_for(lambda: len(seen) > before)

    def warnings() -> list[str]:
        return [
            r.getMessage() for r in caplog_opcua.records if r.levelno == logging.WARNING and "a.whole" in r.getMessage()
        ]

    await driver.connect()
    try:
        if mode == "subscribe":
            await driver.subscribe(sink)
            await wait_for(lambda: len(seen) == 1)
        for n in [2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3]:
            await show([float(i) for i in range(n)])
        assert len(warnings()) == 1, warnings()
        assert "is an array of" in warnings()[0] and "set index: N on the tag" in warnings()[0]
        assert driver.request_errors >= 12  # each bad value counted, logged once
        assert set(seen) == {Quality.BAD}
        # it recovers (a scalar now): one line; it breaks again: one more warning
        await show(7.5)
        assert seen[-1] is Quality.GOOD
        assert [r.getMessage() for r in caplog_opcua.records if "a.whole reads again" in r.getMessage()]
        for n in (4, 6, 8):
            await show([0.0] * n)
        assert len(warnings()) == 2, warnings()
    finally:
        await driver.close()
        await ua_peer.write("Array", [1.0, 2.0, 3.0, 4.0, 5.0])


async def test_real_errors_stay_visible_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """Not a dead connection (a bug, a decoding error): WARNING, once per session, the traceback at DEBUG."""
    from edge_agent.drivers.opcua import logs

    logs.install()
    logs.ONE_LINE.forget("rig")
    session = logging.getLogger("asyncua.client.ua_session.UaSession")
    caplog.set_level(logging.WARNING, logger="asyncua")
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    token = logs.DEVICE.set("rig")
    try:
        for exc in (ValueError("bad\nanswer"), ValueError("bad answer"), ConnectionError("connection lost")):
            try:
                raise exc
            except Exception:
                session.exception("Publish iteration crashed; retrying in 1s")
    finally:
        logs.DEVICE.reset(token)
    shown = [r for r in caplog.records if r.name.startswith("asyncua")]
    # the second ValueError is the same failure still going on (DEBUG, below asyncua's WARNING); the
    # dead connection is INFO, below it too: the poller says that one
    assert [(r.levelname, r.getMessage()) for r in shown] == [
        (
            "WARNING",
            "device rig: asyncua: Publish iteration crashed; retrying in 1s: ValueError: bad answer "
            "(traceback at DEBUG)",
        )
    ]
    assert not shown[0].exc_info
    traces = [r for r in caplog.records if r.name == "edge_agent.drivers.opcua" and r.exc_info]
    assert len(traces) == 3 and all(r.levelno == logging.DEBUG for r in traces)
