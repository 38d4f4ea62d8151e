"""`edge-agent run` reloads its config on a real SIGHUP: a new tag is read, a broken file is reported once
with its FILE:LINE and the old config runs on, and SIGTERM still ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from helpers import ModbusPeer, wait_for


def config(port: int, tags: str) -> str:
    return (
        "devices:\n  - name: plc\n    type: modbus\n    host: 127.0.0.1\n"
        f"    port: {port}\n    poll_interval: 100ms\n    timeout: 500ms\n    tags: {tags}\n"
    )


async def test_sighup_reloads_a_running_edge_agent(modbus_peer: ModbusPeer, tmp_path: Path) -> None:
    modbus_peer.holding[0], modbus_peer.holding[1] = 11, 22
    path = tmp_path / "agent.yaml"
    path.write_text(config(modbus_peer.port, "[{name: v, address: '40001'}]"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edge_agent",
        "run",
        str(path),
        "--output",
        "samples",
        "--watch-interval",
        "0",  # only the signal reloads
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    samples: list[dict[str, object]] = []
    log: list[str] = []

    async def read(stream: asyncio.StreamReader, into: list[Any], parse: bool) -> None:
        async for raw in stream:
            line = raw.decode().rstrip("\n")
            into.append(json.loads(line) if parse else line)

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        asyncio.create_task(read(proc.stdout, samples, True)),
        asyncio.create_task(read(proc.stderr, log, False)),
    ]

    def tag_values(tag: str) -> list[object]:
        return [s["value"] for s in samples if s["tag"] == tag and s["quality"] == "good"]

    try:
        await wait_for(lambda: 11 in tag_values("v"), timeout=30, what="the first samples")
        path.write_text(config(modbus_peer.port, "[{name: v, address: '40001'}, {name: w, address: '40002'}]"))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: 22 in tag_values("w"), timeout=15, what="the new tag's samples")
        path.write_text(config(modbus_peer.port, "[{name: v, address: '40001'}, {name: w, address: 4x}]"))
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: any("still running the previous config" in line for line in log), timeout=15)
        before = len(tag_values("w"))
        await wait_for(lambda: len(tag_values("w")) > before + 3, what="the old config polling on")
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for task in readers:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
    problems = [line for line in log if f"{path}:8: devices[0].tags[1].address" in line]
    assert len(problems) == 1 and " ERROR " in problems[0], log
    assert sum("reloaded" in line and "devices restarted: plc" in line for line in log) == 1, log
    assert "Traceback" not in "\n".join(log)
