"""What the polling benchmarks share: a server in another process, and measuring an agent's CPU per value."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.types import SampleBatch


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(cmd: list[str], port: int, *, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start a benchmark server process and wait until it listens on `port`."""
    server = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit("the benchmark server did not start") from None
            time.sleep(0.1)
    server.terminate()
    raise SystemExit(f"the benchmark server did not listen within {timeout:g} s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """Stop a benchmark server process."""
    server.terminate()
    server.wait(10)


@dataclass(frozen=True)
class Measurement:
    """Good tag values delivered to the buffers in the measured time, and what they cost."""

    values: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float


async def measure_agent(
    cfg: Config, *, duration: float, settle: float, after_settle: Callable[[Agent], None] | None = None
) -> Measurement:
    """Run an agent on `cfg`; after `settle` s, measure `duration` s of good values, overruns and process CPU."""
    good = 0

    def count(batch: SampleBatch) -> None:
        nonlocal good
        good += int((batch.quality == 0).sum())

    agent = Agent(cfg, on_batch=count)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(settle)
    if after_settle is not None:
        after_settle(agent)
    good0, cpu0, wall0 = good, time.process_time(), time.perf_counter()
    over0 = sum(p.stats.overruns for p in agent.pollers)
    await asyncio.sleep(duration)
    good1, cpu1, wall1 = good, time.process_time(), time.perf_counter()
    overruns = sum(p.stats.overruns for p in agent.pollers) - over0
    stop.set()
    await task
    values = good1 - good0
    return Measurement(values, values / (wall1 - wall0), overruns, 1e6 * (cpu1 - cpu0) / max(values, 1))


def machine_line(server: str, duration: float) -> str:
    """The line every benchmark table starts with."""
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}; server: {server} in another process; {duration:g} s per case"
    )
