"""MQTT fixtures: TLS material (the `broker` fixture is shared: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mqttpeer import make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CA, server (127.0.0.1), wrong-name server, rogue-CA server and client certificates."""
    return make_certs(tmp_path_factory.mktemp("certs"))
