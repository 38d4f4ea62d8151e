"""Connecting to an S7 peer that never answers: the device timeout holds, and close() does not wait it out.

The peer is a plain TCP listener that accepts and reads but never answers, as a PLC whose
communication processor hangs does; it also records the COTP connection request the agent sends.
No stopwatch: python-snap7's connection records the timeout it was given and how each connect ended.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
from snap7.connection import ISOTCPConnection
from snap7.error import S7ConnectionError, S7TimeoutError

import edge_agent.drivers.s7.driver as s7_driver
from edge_agent.config import parse_config
from edge_agent.drivers.s7.driver import S7Driver
from edge_agent.errors import DeviceError


class SilentPeer:
    """Accepts connections on 127.0.0.1, keeps what they send, never answers."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        data = bytearray()
        for _ in range(1000):  # bounded: a connection request is a few dozen bytes
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
            self.received.append(bytes(data))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()


@pytest.fixture
async def silent_peer() -> AsyncIterator[SilentPeer]:
    peer = SilentPeer()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


Outcome = tuple[float, type[BaseException] | None]  # (the timeout in force, the exception that ended a connect)


class RecordingConnection(ISOTCPConnection):
    """python-snap7's connection, recording (timeout in force, what ended the connect) for every connect."""

    outcomes: ClassVar[list[Outcome]] = []

    def connect(self, timeout: float = 5.0) -> None:
        try:
            super().connect(timeout)
        except BaseException as exc:
            self.outcomes.append((self.timeout, type(exc)))
            raise
        self.outcomes.append((self.timeout, None))


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Outcome]:
    """The outcomes of the driver's connects, in order."""
    outcomes: list[Outcome] = []
    monkeypatch.setattr(RecordingConnection, "outcomes", outcomes)
    monkeypatch.setattr(s7_driver, "ISOTCPConnection", RecordingConnection)
    return outcomes


def driver_for(port: int, timeout: str, extra: str = "") -> S7Driver:
    text = (
        f"devices:\n  - name: plc\n    type: s7\n    host: 127.0.0.1\n    port: {port}\n    timeout: {timeout}\n"
        f"{extra}    tags:\n      - {{name: v, address: DB1.DBW0, type: int}}\n"
    )
    return S7Driver(parse_config(text).devices[0])  # type: ignore[arg-type]


def tsaps_of(request: bytes) -> tuple[int, int]:
    """(calling, called) TSAP of a TPKT-framed COTP connection request."""
    assert request[0] == 3 and request[5] == 0xE0  # TPKT version 3, COTP CR
    params, out = request[11:], {}
    pos = 0
    while pos + 2 <= len(params):
        code, n = params[pos], params[pos + 1]
        out[code] = params[pos + 2 : pos + 2 + n]
        pos += 2 + n
    return struct.unpack(">H", out[0xC1])[0], struct.unpack(">H", out[0xC2])[0]


async def test_connect_gives_up_after_the_device_timeout(silent_peer: SilentPeer, connects: list[Outcome]) -> None:
    driver = driver_for(silent_peer.port, "300ms")
    with pytest.raises(DeviceError, match=r"cannot connect to 127\.0\.0\.1:\d+ rack 0 slot 1: no answer within 0\.3s"):
        await driver.connect()
    await driver.close()
    # the device's timeout ran out, not python-snap7's own 5 s
    assert connects == [(0.3, S7TimeoutError)]
    # the default connection: basic communication (0x03), rack 0, slot 1
    assert tsaps_of(silent_peer.received[-1]) == (0x0100, 0x0301)


async def test_pg_connection_request_for_rack_0_slot_2(silent_peer: SilentPeer) -> None:
    driver = driver_for(silent_peer.port, "200ms", "    slot: 2\n    connection_type: PG\n")
    with pytest.raises(DeviceError):
        await driver.connect()
    await driver.close()
    assert tsaps_of(silent_peer.received[-1]) == (0x0100, 0x0102)


async def test_close_does_not_wait_for_a_hung_connect(silent_peer: SilentPeer, connects: list[Outcome]) -> None:
    driver = driver_for(silent_peer.port, "5s")
    task = asyncio.create_task(driver.connect())
    async with asyncio.timeout(3):
        while not silent_peer.received:  # the connection request is out: the worker thread waits for an answer
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await driver.close()  # queued behind the connect on its thread: returns once the connect has ended
    # ended by close() shutting its socket, not by its 5 s timeout running out
    assert connects == [(5.0, S7ConnectionError)]
