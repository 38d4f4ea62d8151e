"""MQTT fixtures: a mosquitto subprocess on a free loopback port per test, TLS material, a publisher runner."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mqttpeer import MOSQUITTO, Broker, make_certs


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


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CA, server (127.0.0.1), wrong-name server, rogue-CA server and client certificates."""
    return make_certs(tmp_path_factory.mktemp("certs"))
