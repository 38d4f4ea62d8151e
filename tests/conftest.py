"""Shared fixtures: real peers on free loopback ports (the peers themselves are in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import MOSQUITTO, Broker, ModbusPeer


@pytest.fixture
async def modbus_peer() -> AsyncIterator[ModbusPeer]:
    """A pymodbus server on a free 127.0.0.1 port, stopped after the test."""
    peer = ModbusPeer(holes=[(900, 1000)])
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto on a free 127.0.0.1 port (anonymous, persistence on), stopped after the test."""
    assert Path(MOSQUITTO).exists(), "mosquitto is not installed: tests/run.sh installs it with apt"
    b = Broker(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.kill()
