"""observe.listen with port 0: the log names the port the system chose, and it answers there."""

from __future__ import annotations

import logging

import pytest
from helpers import http_get

from edge_agent.observe import HealthServer, Metrics


async def test_port_zero_logs_the_bound_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.observe")
    server = HealthServer(Metrics(), [])
    await server.start("127.0.0.1:0")
    try:
        host, _, port = server.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert f"http://127.0.0.1:{port}/metrics" in caplog.text and ":0/" not in caplog.text
        assert await http_get(int(port), "/healthz") == (200, "ok\n")
    finally:
        await server.stop()
