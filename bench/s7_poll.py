"""Benchmark: the agent polling many S7 tags from a python-snap7 server in another process.

Prints, per case: requests per cycle (and a lower bound: the tags' bytes over the data one answer
carries), request items (byte ranges) per cycle, tag values/s delivered to the buffers, overruns, and the agent's CPU
microseconds per tag value (process CPU time of the agent process only; the server runs in its own
process). The server is pure Python, so at high rates it, not the agent, sets the ceiling.

    python bench/s7_poll.py                  # 1k and 10k tags at 1 s, planner on and off, then at 0.1 s
    python bench/s7_poll.py --duration 5 --tags 1000 --fast 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from harness import free_port, machine_line, measure_agent, start_server, stop_server

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.s7.driver import S7Driver
from edge_agent.drivers.s7.planner import payload_limit

DB_SIZE = 16384
TAGS_PER_DB = 1000
TYPES = [("real", 4), ("real", 4), ("int", 2), ("dint", 4), ("word", 2), ("bool", 0)]


def serve(port: int, n_dbs: int) -> None:
    """Server mode: DB1..DBn of DB_SIZE bytes each, filled so that no REAL is NaN."""
    from snap7.server import Server
    from snap7.type import SrvArea

    logging.getLogger("snap7").setLevel(logging.ERROR)
    rng = random.Random(0)
    server = Server(log=False)
    for n in range(1, n_dbs + 1):
        server.register_area(SrvArea.DB, n, bytearray(rng.randrange(0, 0x40) for _ in range(DB_SIZE)))
    server.start_to("127.0.0.1", port)
    while True:
        time.sleep(3600)


def layout(n_tags: int, seed: int = 1) -> list[tuple[str, int, str]]:
    """(type, DB, address) as an integrator maps them: mixed types, bits packed, small gaps, a few jumps."""
    rng = random.Random(seed)
    out: list[tuple[str, int, str]] = []
    db, pos, bit = 1, 0, 0
    for i in range(n_tags):
        if i and i % TAGS_PER_DB == 0:
            db, pos, bit = db + 1, 0, 0
        dtype, size = TYPES[rng.randrange(len(TYPES))]
        if dtype == "bool":
            out.append((dtype, db, f"DB{db}.DBX{pos}.{bit}"))
            bit = (bit + 1) % 8
            pos += bit == 0
            continue
        if bit:
            pos, bit = pos + 1, 0
        letter = {2: "W", 4: "D"}[size]
        out.append((dtype, db, f"DB{db}.DB{letter}{pos}"))
        pos += size + rng.choice([0] * 15 + [1, 2, 6, 40])  # 40: a separate block
    assert pos < DB_SIZE, "layout does not fit the server"
    return out


def config_text(port: int, tags: list[tuple[str, int, str]], interval: float, planner: str) -> str:
    lines = [
        "devices:",
        "  - name: bench",
        "    type: s7",
        "    host: 127.0.0.1",
        f"    port: {port}",
        f"    poll_interval: {interval}s",
        "    timeout: 2s",
        f"    planner: {{mode: {planner}, max_gap: 16}}",
        "    tags:",
    ]
    lines += [
        f"      - {{name: t{i}, address: {a}" + (f", type: {d}}}" if d != "bool" else "}")
        for i, (d, _, a) in enumerate(tags)
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    tags: int
    interval: float
    planner: str
    requests: int
    items: int
    minimum: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float


async def measure(port: int, n_tags: int, interval: float, planner: str, duration: float) -> Row:
    tags = layout(n_tags)
    cfg = parse_config(config_text(port, tags, interval, planner))
    plan: dict[str, int] = {}

    def read_plan(agent: Agent) -> None:
        # after connecting: the driver has re-planned for the PDU the PLC granted
        driver = agent.pollers[0].driver
        assert isinstance(driver, S7Driver)
        used = {(t.address.db, t.address.byte + k) for t in driver.config.tags for k in range(t.size)}
        plan.update(
            requests=sum(driver.requests_per_cycle.values()),
            items=sum(driver.items_per_cycle.values()),
            minimum=-(-len(used) // payload_limit(driver.pdu)),
        )  # every byte once, answers full

    m = await measure_agent(cfg, duration=duration, settle=min(2.0, duration / 4), after_settle=read_plan)
    print(f"  {n_tags} tags at {interval:g}s, planner {planner}: {m.values} values", file=sys.stderr, flush=True)
    return Row(
        n_tags,
        interval,
        planner,
        plan["requests"],
        plan["items"],
        plan["minimum"],
        m.values_per_s,
        m.overruns,
        m.cpu_us_per_value,
    )


async def run(args: argparse.Namespace) -> list[Row]:
    port = free_port()
    n_dbs = max(args.tags) // TAGS_PER_DB + 1
    server = start_server([sys.executable, __file__, "--serve", str(port), "--dbs", str(n_dbs)], port)
    try:
        rows = []
        for n in args.tags:
            for planner in ("merge", "none"):
                rows.append(await measure(port, n, 1.0, planner, args.duration))
        for n in args.tags:
            rows.append(await measure(port, n, args.fast, "merge", args.duration))
        return rows
    finally:
        stop_server(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dbs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--tags", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--fast", type=float, default=0.1, help="poll interval of the max-rate cases (seconds)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.dbs)
        return
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(run(args))
    print(machine_line("python-snap7", args.duration))
    head = (
        "tags",
        "interval",
        "planner",
        "requests/cycle",
        "items/cycle",
        "lower bound",
        "values/s",
        "overruns",
        "CPU µs/value",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r.tags} | {r.interval:g}s | {r.planner} | {r.requests} | {r.items} | {r.minimum} | "
            f"{r.values_per_s:,.0f} | {r.overruns} | {r.cpu_us_per_value:.2f} |"
        )


if __name__ == "__main__":
    main()
