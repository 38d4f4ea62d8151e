"""Fixtures for the OPC UA driver tests: one asyncua server per session (its init costs ~0.7 s)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from opcua_peer import Pki, UaPeer, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made once per test session."""
    return make_pki(tmp_path_factory.mktemp("opcua-pki"))


@pytest_asyncio.fixture(loop_scope="session")
async def own_peer(pki: Pki) -> AsyncIterator[UaPeer]:
    """A server of the test's own, free to be stopped and restarted."""
    peer = UaPeer(pki)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def ua_peer(pki: Pki) -> AsyncIterator[UaPeer]:
    """The shared server: tests that change values put them back, tests that restart it use their own."""
    peer = UaPeer(pki)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@pytest.fixture
def caplog_opcua(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the driver's log at INFO."""
    with caplog.at_level(logging.INFO, logger="edge_agent.drivers.opcua"):
        yield caplog
