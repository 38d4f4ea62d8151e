"""Metrics and health endpoints of a running agent, read over HTTP."""

from __future__ import annotations

import asyncio
import json

from helpers import ModbusPeer, free_port, http_get, wait_for

from edge_agent.agent import Agent
from edge_agent.config import parse_config


async def test_metrics_healthz_readyz(modbus_peer: ModbusPeer) -> None:
    port = free_port()
    cfg = parse_config(
        "devices:\n"
        f"  - {{name: plc, type: modbus, host: 127.0.0.1, port: {modbus_peer.port}, poll_interval: 50ms,\n"
        '     tags: [{name: v, address: "40001"}]}\n'
        f"  - {{name: gone, type: modbus, host: 127.0.0.1, port: {free_port()},\n"
        "     tags: [{name: w, address: '40001'}]}\n"
        f"observe: {{listen: '127.0.0.1:{port}'}}\n"
    )
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_for(lambda: agent.stats().devices[0].reads >= 3)
        status, body = await http_get(port, "/healthz")
        assert status == 200 and body == "ok\n"
        status, body = await http_get(port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        status, body = await http_get(port, "/metrics")
        assert status == 200
        assert 'edge_agent_device_up{device="plc"} 1.0' in body
        assert 'edge_agent_device_up{device="gone"} 0.0' in body
        assert 'edge_agent_poll_seconds_count{device="plc"}' in body
        reads = [ln for ln in body.splitlines() if ln.startswith('edge_agent_reads_total{device="plc"}')]
        assert reads and float(reads[0].split()[-1]) >= 3
        assert (await http_get(port, "/nope"))[0] == 404
        await modbus_peer.stop()
        await wait_for(lambda: not agent.stats().devices[0].connected)
        status, body = await http_get(port, "/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "failing": ["no device answers"]}
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
