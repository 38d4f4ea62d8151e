"""observe.listen with port 0: the log names the port the system chose, and it answers there."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edge_agent.observe import HealthServer, Metrics


async def test_port_zero_logs_the_bound_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.observe")
    server = HealthServer(Metrics(), [])
    await server.start("127.0.0.1:0")
    try:
        host, _, port = server.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        assert f"http://127.0.0.1:{port}/metrics" in caplog.text and ":0/" not in caplog.text
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"ok\n")
        writer.close()
    finally:
        await server.stop()
