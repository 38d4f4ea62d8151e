"""Hostile Modbus answers: every answer must match its request, or its request's tags are bad.

Against `hostile.HostileModbus`, through the real driver, poller, agent and `edge-agent read`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import sys
from pathlib import Path

import pytest
from helpers import free_port, wait_for
from helpers import latest_value as value
from hostile import HostileModbus, Lie

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers import REGISTRY
from edge_agent.drivers.modbus.config import ModbusDevice
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.errors import DeviceError
from edge_agent.types import Quality

pytestmark = pytest.mark.integration

TEMP, LIE = 21.5, 999.0  # the holding registers hold TEMP; the input registers at the same address hold LIE


def config(port: int, timeout: str = "300ms") -> str:
    """One device: a float32 in holding registers 0-1 (request `40001–40002`) and a coil (request `00001`)."""
    return (
        f"devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n    port: {port}\n"
        f"    poll_interval: 50ms\n    timeout: {timeout}\n    backoff: {{initial: 50ms, max: 200ms}}\n"
        "    tags:\n"
        '      - {name: temp, address: "40001", type: float32}\n'
        '      - {name: run, address: "00001"}\n'
    )


def fill(server: HostileModbus) -> None:
    server.place("holding", 0, list(struct.unpack(">HH", struct.pack(">f", TEMP))))
    server.place("input", 0, list(struct.unpack(">HH", struct.pack(">f", LIE))))
    server.coils[0] = True


def device(port: int) -> ModbusDevice:
    dev = parse_config(config(port)).devices[0]
    assert isinstance(dev, ModbusDevice)
    return dev


async def read_once(server: HostileModbus) -> dict[str, tuple[float, Quality]]:
    """One scan through a fresh driver: tag -> (value, quality); DeviceError when the read fails as a whole."""
    driver = ModbusDriver(device(server.port))
    await driver.connect()
    try:
        batch = await asyncio.wait_for(driver.read(driver.groups[0]), 5)
    finally:
        await driver.close()
    return {tag: (float(batch.values[i]), Quality(batch.quality[i])) for i, tag in enumerate(batch.tags)}


async def test_honest_answers_read_good(hostile: HostileModbus) -> None:
    # the server itself: honest, it serves what the tables hold (so the lies below are the only difference)
    fill(hostile)
    assert await read_once(hostile) == {"temp": (TEMP, Quality.GOOD), "run": (1.0, Quality.GOOD)}
    assert [(r.function, r.start, r.count) for r in hostile.requests] == [(3, 0, 2), (1, 0, 1)]


# lies that leave a consistent frame which answers something else: that request's tags are bad, the rest good
MISMATCHES = [
    (3, Lie(function=4), "answered function code 4 (read input registers) to function code 3 (read holding registers)"),
    (3, Lie(count=3), "answered 6 bytes to a read of 2 registers (4 bytes)"),
    (3, Lie(count=1), "answered 2 bytes to a read of 2 registers (4 bytes)"),
    (3, Lie(tid=0), "answered transaction id 0 to transaction 1"),
    (3, Lie(pdu=b"\x84\x02"), "answered an exception for function code 4 to function code 3 (read holding registers)"),
    (1, Lie(function=3), "answered function code 3 (read holding registers) to function code 1 (read coils)"),
    (1, Lie(function=2), "answered function code 2 (read discrete inputs) to function code 1 (read coils)"),
    (1, Lie(count=9), "answered 2 bytes to a read of 1 coil (1 byte)"),
]


@pytest.mark.parametrize(("function", "lie", "why"), MISMATCHES)
async def test_an_answer_to_something_else_marks_its_request_bad(
    hostile: HostileModbus, caplog: pytest.LogCaptureFixture, function: int, lie: Lie, why: str
) -> None:
    caplog.set_level(logging.INFO)
    fill(hostile)
    hostile.lie(function, lie)
    got = await read_once(hostile)
    liar, honest = ("temp", "run") if function == 3 else ("run", "temp")
    assert math.isnan(got[liar][0]) and got[liar][1] is Quality.BAD, got
    assert got[honest][1] is Quality.GOOD, got
    label = "40001–40002" if function == 3 else "00001"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"device plc: {label}: {why}; tags {liar} marked bad"]


# frames that contradict themselves or never arrive whole: the stream cannot be trusted, the read fails
BROKEN = [
    (3, Lie(byte_count=200), "a corrupt answer: its byte count says 200 but 4 follow"),
    (3, Lie(pad=2), "a corrupt answer: its byte count says 4 but 6 follow"),
    (3, Lie(pdu=b"\x03"), "a corrupt answer: it has no byte count"),
    (1, Lie(byte_count=5), "a corrupt answer: its byte count says 5 but 1 follows"),
    (3, Lie(pdu=b"\x41\x00\x00"), "an answer that does not decode (10 bytes: 00 01 00 00 00 04 01 41 00 00)"),
    (3, Lie(pdu=b"\x83"), "an answer that does not decode (8 bytes: 00 01 00 00 00 02 01 83)"),
    (3, Lie(tid=7), "no answer within 0.3s"),  # pymodbus skips an answer to another transaction
    (3, Lie(cut=10), "no answer within 0.3s"),  # truncated
    (3, Lie(pad=300), "no answer within 0.3s"),  # longer than Modbus's 260 bytes: dropped
    (3, Lie(garbage=b"\xde\xad\xbe\xef" * 4), "no answer within 0.3s"),
    (3, Lie(silent=True), "no answer within 0.3s"),
    (3, Lie(delay=0.6), "no answer within 0.3s"),
    (3, Lie(cut=9, reset=True), "no answer within 0.3s; the device closed the connection"),
]


@pytest.mark.parametrize(("function", "lie", "why"), BROKEN)
async def test_a_broken_answer_fails_the_read(hostile: HostileModbus, function: int, lie: Lie, why: str) -> None:
    fill(hostile)
    hostile.lie(function, lie)
    with pytest.raises(DeviceError) as err:
        await read_once(hostile)
    label = "40001–40002" if function == 3 else "00001"
    assert str(err.value) == f"device plc: {label}: {why}"


async def test_a_slow_answer_in_time_is_good(hostile: HostileModbus) -> None:
    fill(hostile)
    hostile.lie(3, Lie(delay=0.1))
    assert (await read_once(hostile))["temp"] == (TEMP, Quality.GOOD)


def crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]


async def test_coils_answered_as_registers_never_crash_the_poller(
    hostile: HostileModbus, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 3: coil reads answered with function code 3 crashed the poller every 5 s (IndexError)."""
    caplog.set_level(logging.INFO)
    fill(hostile)
    hostile.lie(1, Lie(function=3))
    agent = Agent(parse_config(config(hostile.port)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: agent.stats().devices[0].reads >= 10)
        assert value(agent, "temp") == (TEMP, Quality.GOOD)
        assert value(agent, "run") is not None and value(agent, "run")[1] is Quality.BAD  # type: ignore[index]
        assert agent.stats().devices[0].connected and agent.stats().devices[0].failures == 0
        hostile.lie(1, None)
        await wait_for(lambda: value(agent, "run") == (1.0, Quality.GOOD))
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert crashes(caplog) == []
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "edge_agent.drivers.modbus"]
    assert lines == [
        (
            logging.WARNING,
            "device plc: 00001: answered function code 3 (read holding registers) to function code 1 "
            "(read coils); tags run marked bad",
        ),
        (logging.INFO, "device plc: 00001 answers again"),
    ]


@pytest.mark.parametrize(
    ("lie", "why"),
    [
        (Lie(byte_count=200), "a corrupt answer: its byte count says 200 but 4 follow"),
        (Lie(pdu=b"\x41\x00\x00"), "an answer that does not decode (10 bytes: 00 01 00 00 00 04 01 41 00 00)"),
    ],
)
async def test_a_malformed_frame_is_one_line_not_a_traceback(
    hostile: HostileModbus, caplog: pytest.LogCaptureFixture, lie: Lie, why: str, request: pytest.FixtureRequest
) -> None:
    """Issue 11 item 5: a lying byte count logged asyncio's 'Fatal error: protocol.data_received() call failed'
    with pymodbus's traceback at every reconnect; now the poller's one line, and the device comms-lost."""
    caplog.set_level(logging.INFO)
    # as every edge-agent command sets it (cli/logs.py): pymodbus' own lines repeat the poller's; another
    # test may have left this logger at DEBUG
    pymodbus_log = logging.getLogger("pymodbus")
    request.addfinalizer(lambda level=pymodbus_log.level: pymodbus_log.setLevel(level))
    pymodbus_log.setLevel(logging.CRITICAL)
    fill(hostile)
    hostile.lie(3, lie)
    agent = Agent(parse_config(config(hostile.port)))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: hostile.connections >= 4)  # several reconnects, each answered the same way
        got = value(agent, "temp")
        assert got is not None and got[1] is Quality.COMMS_LOST
        assert not agent.stats().devices[0].connected
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    loud = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [
        ("edge_agent.poller", logging.WARNING, f"device plc: 40001–40002: {why}; retrying with backoff up to 0.2s")
    ]
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]
    assert crashes(caplog) == []


async def test_read_cli_does_not_print_an_input_register_as_a_holding_one(
    hostile: HostileModbus, tmp_path: Path
) -> None:
    """Issue 11 item 4: a holding read answered with function code 4 printed the input registers' 999 as good."""
    fill(hostile)
    hostile.lie(3, Lie(function=4))
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(config(hostile.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent",
        "read",
        str(cfg),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1, err
    rows = {r["tag"]: r for r in map(json.loads, out.decode().splitlines())}
    assert rows["temp"]["quality"] == "bad" and rows["temp"]["value"] is None, rows
    assert rows["run"]["quality"] == "good" and rows["run"]["value"] is True
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        " WARNING edge_agent.drivers.modbus: device plc: 40001–40002: answered function code 4 "
        "(read input registers) to function code 3 (read holding registers); tags temp marked bad"
    ), lines


@pytest.mark.parametrize("listening", [False, True])
async def test_a_failed_connect_says_refused_or_closed(listening: bool) -> None:
    """Nothing listening is 'connection refused' with the port; a listener that hangs up at once says so."""
    port = free_port()
    server = None
    if listening:

        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", port)
    dev = parse_config(
        f"devices: [{{name: plc, type: modbus, host: 127.0.0.1, port: {port}, timeout: 500ms,"
        " tags: [{name: v, address: '40001'}]}]\n"
    ).devices[0]
    driver = REGISTRY["modbus"].build(dev)
    try:
        with pytest.raises(DeviceError) as caught:
            await driver.connect()
            await driver.read(driver.groups[0])
    finally:
        await driver.close()
        if server is not None:
            server.close()
            await server.wait_closed()
    text = str(caught.value)
    if listening:
        assert "connection refused" not in text
    else:
        assert f"connection refused (nothing listens on port {port}" in text
