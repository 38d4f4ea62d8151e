"""Benchmark: the agent polling many Modbus tags from a pymodbus server in another process.

Prints, per case: requests per cycle, the minimum possible with any gap bridged and the minimum
when no more than max_gap unmapped registers may be read (the planner's own constraint, computed
by an independent dynamic programme), tag values/s delivered to the
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
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from harness import free_port, machine_line, measure_agent, start_server, stop_server

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.modbus.config import MAX_REGISTERS
from edge_agent.drivers.modbus.driver import ModbusDriver
from edge_agent.drivers.planner import Span, minimum_reads

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
        # mostly packed, small gaps, and now and then a separate block (1 %)
        addr += size + (40 if rng.random() < 0.01 else rng.choice([0] * 15 + [1, 2, 6]))
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
        # "merge/64": merge across gaps up to 64 registers (this server maps every register)
        f"    planner: {{mode: {planner.split('/')[0]}, max_gap: {planner.split('/')[1] if '/' in planner else 16}}}",
        "    tags:",
    ]
    lines += [f'      - {{name: t{i}, address: "holding:{a}", type: {d}}}' for i, (d, a, _) in enumerate(tags)]
    return "\n".join(lines) + "\n"


def fewest_reads(spans: list[tuple[int, int]], max_count: int, max_gap: int) -> int:
    """Fewest reads covering every (start, size) span, skipping at most max_gap units between spans: O(n·k) DP.

    An independent check of the greedy planner: best[i] = fewest reads for the first i spans, each read
    covering spans j..i-1 contiguously within max_count and without a gap wider than max_gap.
    """
    spans = sorted(spans)
    best = [0] + [1 << 30] * len(spans)
    for i in range(1, len(spans) + 1):
        end = spans[i - 1][0] + spans[i - 1][1]
        for j in range(i - 1, -1, -1):
            if end - spans[j][0] > max_count or (j < i - 1 and spans[j + 1][0] - (spans[j][0] + spans[j][1]) > max_gap):
                break
            best[i] = min(best[i], best[j] + 1)
    return best[-1]


@dataclass
class Row:
    tags: int
    interval: float
    planner: str
    requests: int
    minimum: int
    minimum_at_gap: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float


async def measure(port: int, n_tags: int, interval: float, planner: str, duration: float) -> Row:
    tags = layout(n_tags)
    cfg = parse_config(config_text(port, tags, interval, planner))
    spans = [Span(a, s, i) for i, (_, a, s) in enumerate(tags)]
    minimum = minimum_reads(spans, max_count=MAX_REGISTERS)
    # the fewest reads that skip no more than max_gap unmapped registers (exhaustive DP, not the planner)
    max_gap = int(planner.split("/")[1]) if "/" in planner else 16
    at_gap = fewest_reads([(a, s) for _, a, s in tags], MAX_REGISTERS, max_gap) if planner != "none" else len(tags)
    requests = 0

    def plan(agent: Agent) -> None:
        nonlocal requests
        driver = agent.pollers[0].driver
        assert isinstance(driver, ModbusDriver)
        requests = sum(driver.requests_per_cycle.values())

    m = await measure_agent(cfg, duration=duration, settle=min(2.0, duration / 4), after_settle=plan)
    print(f"  {n_tags} tags at {interval:g}s, planner {planner}: {m.values} values", file=sys.stderr, flush=True)
    return Row(n_tags, interval, planner, requests, minimum, at_gap, m.values_per_s, m.overruns, m.cpu_us_per_value)


async def run(args: argparse.Namespace) -> list[Row]:
    port = free_port()
    server = start_server([sys.executable, __file__, "--serve", str(port)], port)
    try:
        rows = []
        for n in args.tags:
            for planner in ("merge", "none"):
                rows.append(await measure(port, n, 1.0, planner, args.duration))
        rows.append(await measure(port, max(args.tags), 1.0, "merge/64", args.duration))
        for n in args.tags:
            rows.append(await measure(port, n, args.fast, "merge", args.duration))
        return rows
    finally:
        stop_server(server)


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
    print(machine_line("pymodbus", args.duration))
    head = (
        "tags",
        "interval",
        "planner",
        "requests/cycle",
        "minimum (any gap)",
        "within",
        "minimum at max_gap",
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
            f"{r.minimum_at_gap} | {r.values_per_s:,.0f} | {r.overruns} | {r.cpu_us_per_value:.2f} |"
        )


if __name__ == "__main__":
    main()
