"""Modbus fixtures: a hostile Modbus TCP server on a free loopback port per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hostile import HostileModbus


@pytest.fixture
async def hostile() -> AsyncIterator[HostileModbus]:
    """A Modbus TCP server whose answers the test bends (see hostile.Lie), stopped after the test."""
    server = HostileModbus()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
