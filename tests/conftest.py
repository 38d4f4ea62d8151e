"""Shared fixtures: real peers on free loopback ports."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peers import ModbusPeer


@pytest.fixture
async def modbus_peer() -> AsyncIterator[ModbusPeer]:
    """A pymodbus server on a free 127.0.0.1 port, stopped after the test."""
    peer = ModbusPeer(holes=[(900, 1000)])
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()
