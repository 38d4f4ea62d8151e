"""Benchmark: the agent polling many Modbus tags from a pymodbus server in another process.

Prints, per case: requests per cycle (and the minimum possible), tag values/s delivered to the
buffers, overruns, and the agent's CPU microseconds per tag value (process CPU time of the agent
process only; the server runs in its own process).

    python bench/modbus_poll.py                 # 1k and 10k tags at 1 s, planner on and off, 10 s each
    python bench/modbus_poll.py --duration 20 --tags 1000 10000 --fast 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.modbus import MAX_REGISTERS, ModbusDriver
from edge_agent.drivers.planner import Span, minimum_reads
from edge_agent.types import SampleBatch

REGISTERS = 60000
TYPES = [("float32", 2), ("float32", 2), ("int16", 1), ("uint32", 2), ("uint16", 1)]


def serve(port: int) -> None:
    """Server mode: a pymodbus server with REGISTERS holding registers of pseudo-random values."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    rng = random.Random(0)
    values = [rng.randrange(0, 0x4000) for _ in range(REGISTERS)]
    regs = [SimData(0, values=values, datatype=DataType.REGISTERS)]
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    device = SimDevice(1, simdata=(bits, bits, regs, [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]))

    async def main() -> None:
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever()

    asyncio.run(main())


def layout(n_tags: int, seed: int = 1) -> list[tuple[str, int, int]]:
    """Tags as an integrator maps them: mixed types, mostly packed, with small unmapped gaps."""
    rng = random.Random(seed)
    out, addr = [], 0
    for _ in range(n_tags):
        dtype, size = TYPES[rng.randrange(len(TYPES))]
        out.append((dtype, addr, size))
        addr += size + rng.choice([0] * 15 + [1, 2, 6, 40])  # 40: a separate block
    assert addr < REGISTERS, "layout does not fit the server"
    return out


def config_text(port: int, tags: list[tuple[str, int, int]], interval: float, planner: str) -> str:
    lines = [
        "devices:",
        "  - name: bench",
        "    type: modbus",
        "    host: 127.0.0.1",
        f"    port: {port}",
        f"    poll_interval: {interval}s",
        "    timeout: 2s",
        f"    planner: {{mode: {planner}, max_gap: 8}}",
        "    tags:",
    ]
    lines += [f'      - {{name: t{i}, address: "holding:{a}", type: {d}}}' for i, (d, a, _) in enumerate(tags)]
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    tags: int
    interval: float
    planner: str
    requests: int
    minimum: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float


async def measure(port: int, n_tags: int, interval: float, planner: str, duration: float) -> Row:
    tags = layout(n_tags)
    cfg = parse_config(config_text(port, tags, interval, planner))
    good = 0

    def count(batch: SampleBatch) -> None:
        nonlocal good
        good += int((batch.quality == 0).sum())

    agent = Agent(cfg, on_batch=count)
    driver = agent.pollers[0].driver
    assert isinstance(driver, ModbusDriver)
    requests = sum(driver.requests_per_cycle.values())
    minimum = minimum_reads([Span(a, s, i) for i, (_, a, s) in enumerate(tags)], max_count=MAX_REGISTERS)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(min(2.0, duration / 4))  # connect and settle
    good0, cpu0, wall0 = good, time.process_time(), time.perf_counter()
    over0 = agent.pollers[0].stats.overruns
    await asyncio.sleep(duration)
    good1, cpu1, wall1 = good, time.process_time(), time.perf_counter()
    overruns = agent.pollers[0].stats.overruns - over0
    stop.set()
    await task
    values = good1 - good0
    print(f"  measured {n_tags} tags at {interval:g}s, planner {planner}: {values} values", file=sys.stderr, flush=True)
    return Row(
        n_tags,
        interval,
        planner,
        requests,
        minimum,
        values / (wall1 - wall0),
        overruns,
        1e6 * (cpu1 - cpu0) / max(values, 1),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(args: argparse.Namespace) -> list[Row]:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])  # noqa: ASYNC220 (started once)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the benchmark server did not start") from None
                await asyncio.sleep(0.1)
        rows = []
        for n in args.tags:
            for planner in ("merge", "none"):
                rows.append(await measure(port, n, 1.0, planner, args.duration))
        for n in args.tags:
            rows.append(await measure(port, n, args.fast, "merge", args.duration))
        return rows
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--tags", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--fast", type=float, default=0.1, help="poll interval of the max-rate cases (seconds)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    rows = asyncio.run(run(args))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}; server: pymodbus in another process; {args.duration:g} s per case"
    )
    head = (
        "tags",
        "interval",
        "planner",
        "requests/cycle",
        "minimum",
        "within",
        "values/s",
        "overruns",
        "CPU µs/value",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        within = f"{100 * (r.requests / r.minimum - 1):+.0f}%"
        print(
            f"| {r.tags} | {r.interval:g}s | {r.planner} | {r.requests} | {r.minimum} | {within} | "
            f"{r.values_per_s:,.0f} | {r.overruns} | {r.cpu_us_per_value:.2f} |"
        )


if __name__ == "__main__":
    main()
