"""Modbus fixtures: a hostile Modbus TCP server on a free loopback port per test."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
