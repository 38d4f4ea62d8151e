"""S7 fixtures: a python-snap7 server on a free loopback port per test."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from s7peer import S7Peer

# the server logs every read of a missing DB or past an area's end at WARNING: that is what the tests do
logging.getLogger("snap7.server").setLevel(logging.ERROR)


@pytest.fixture
async def s7_peer() -> AsyncIterator[S7Peer]:
    """DB1 (1024 bytes), M (256), I and Q (64 each), stopped after the test."""
    peer = S7Peer()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()
