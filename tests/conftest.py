"""Shared fixtures: real peers on free loopback ports."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

from peers import ModbusPeer

# Property tests check properties, not speed: no per-example deadline and no "input generation is slow"
# health check, which fail on a loaded 2-core machine (CI shares it with servers the other tests start).
settings.register_profile("edge-agent", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edge-agent")


@pytest.fixture
async def modbus_peer() -> AsyncIterator[ModbusPeer]:
    """A pymodbus server on a free 127.0.0.1 port, stopped after the test."""
    peer = ModbusPeer(holes=[(900, 1000)])
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()
