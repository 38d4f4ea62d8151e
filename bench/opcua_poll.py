"""Benchmark: the agent reading many OPC UA tags from an asyncua server in another process, read vs subscribe.

Prints, per case: Read requests per cycle, the value changes/s the server really made (it rewrites
every value each tick, and a tick that runs late is not made up), tag values/s delivered to the buffers
(a subscription delivers changes, a read delivers every poll), overruns, and the
agent's CPU microseconds per tag value (process CPU time of the agent process only; the server,
which rewrites every value on each of its ticks, runs in its own process).

    python bench/opcua_poll.py                        # 1k tags at 1 s and 100 ms, read and subscribe, 10 s each
    python bench/opcua_poll.py --tags 1000 5000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from harness import free_port, machine_line, measure_agent, start_server, stop_server

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.drivers.opcua.driver import OpcUaDriver

NAMESPACE = "urn:edge-agent:bench"
# what a plant's tag list looks like: mostly analog values, some counters and states
TYPES = ["Double"] * 6 + ["Float"] * 2 + ["Int32", "Boolean"]


def write_tick(path: str, k: int) -> None:
    """The server's tick count, for the bench to read (a few bytes on the temp disk)."""
    with open(path + ".tmp", "w") as f:
        f.write(str(k))
    os.replace(path + ".tmp", path)  # the bench never reads a half-written file


def serve(port: int, n_tags: int, period: float, ticks_file: str | None) -> None:
    """Server mode: n_tags variables whose values all change every `period` seconds (when it keeps up).

    Each tick's number goes to `ticks_file`, so the bench reports the change rate the server really made.
    """
    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)

    async def main() -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(ua.NodeId("Bench", idx), "Bench")
        nodes = []
        for i in range(n_tags):
            kind = TYPES[i % len(TYPES)]
            vt = getattr(ua.VariantType, kind)
            value = {"Boolean": False, "Int32": 0}.get(kind, 0.0)
            node = await folder.add_variable(ua.NodeId(f"T{i}", idx), f"T{i}", ua.Variant(value, vt))
            nodes.append((node.nodeid, vt))
        await server.start()
        rng = random.Random(0)
        k = 0
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            next_tick += period
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            next_tick = max(next_tick, loop.time())  # a late tick is not made up: the rate shows it
            k += 1
            if ticks_file:
                write_tick(ticks_file, k)
            for nodeid, vt in nodes:
                if vt is ua.VariantType.Boolean:
                    v: object = k % 2 == 0
                elif vt is ua.VariantType.Int32:
                    v = k
                else:
                    v = rng.random() * 100.0
                await server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(v, vt)))

    asyncio.run(main())


def config_text(port: int, n_tags: int, interval: float, mode: str, queue_size: int = 1) -> str:
    lines = [
        "devices:",
        "  - name: bench",
        "    type: opcua",
        f"    endpoint: opc.tcp://127.0.0.1:{port}/bench",
        f"    mode: {mode}",
        f"    poll_interval: {interval}s",
        "    timeout: 5s",
        "    tags:",
    ]
    extra = f", queue_size: {queue_size}" if mode == "subscribe" and queue_size != 1 else ""
    lines += [f'      - {{name: t{i}, node: "nsu={NAMESPACE};s=T{i}"{extra}}}' for i in range(n_tags)]
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    tags: int
    interval: float
    mode: str
    requests: int
    values_per_s: float
    overruns: int
    cpu_us_per_value: float
    server_changes_per_s: float


def ticks(path: str) -> tuple[int, float]:
    """The server's tick count now, and when it was read."""
    try:
        with open(path) as f:
            return int(f.read() or 0), time.monotonic()
    except (OSError, ValueError):
        return 0, time.monotonic()


async def measure(
    port: int, n_tags: int, interval: float, mode: str, duration: float, ticks_file: str, queue_size: int
) -> Row:
    cfg = parse_config(config_text(port, n_tags, interval, mode, queue_size))
    requests = 0

    start = (0, 0.0)

    def plan(agent: Agent) -> None:
        nonlocal requests, start
        start = ticks(ticks_file)
        driver = agent.pollers[0].driver
        assert isinstance(driver, OpcUaDriver)
        requests = sum(driver.requests_per_cycle.values())

    # connect, subscribe and settle before measuring
    m = await measure_agent(cfg, duration=duration, settle=min(3.0, duration / 3), after_settle=plan)
    end = ticks(ticks_file)
    changes = (end[0] - start[0]) * n_tags / max(end[1] - start[1], 1e-9)
    print(f"  {n_tags} tags at {interval:g}s, {mode}: {m.values} values", file=sys.stderr, flush=True)
    return Row(n_tags, interval, mode, requests, m.values_per_s, m.overruns, m.cpu_us_per_value, changes)


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ticks_file = os.path.join(tmp, "ticks")
        for n in args.tags:
            port = free_port()
            cmd = [sys.executable, __file__, "--serve", str(port), "--serve-tags", str(n)]
            cmd += ["--update", str(args.update), "--ticks-file", ticks_file]
            server = start_server(cmd, port)
            try:
                for interval in (1.0, args.fast):
                    for mode in ("read", "subscribe"):
                        rows.append(await measure(port, n, interval, mode, args.duration, ticks_file, args.queue_size))
            finally:
                stop_server(server)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-tags", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--ticks-file", help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--tags", type=int, nargs="+", default=[1000])
    p.add_argument("--fast", type=float, default=0.1, help="interval of the fast cases (seconds)")
    p.add_argument("--queue-size", type=int, default=1, help="subscribe mode: each tag's queue_size (default 1)")
    p.add_argument("--update", type=float, default=0.1, help="how often the server changes every value (seconds)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.serve_tags, args.update, args.ticks_file)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    rows = asyncio.run(run(args))
    print(machine_line(f"asyncua (every value changing every {args.update:g} s)", args.duration))
    head = (
        "tags",
        "interval",
        "mode",
        "Read requests/cycle",
        "server changes/s",
        "values/s",
        "overruns",
        "CPU µs/value",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        req = str(r.requests) if r.mode == "read" else "-"
        cpu = f"{r.cpu_us_per_value:.2f}" if math.isfinite(r.cpu_us_per_value) else "-"
        print(
            f"| {r.tags} | {r.interval:g}s | {r.mode} | {req} | {r.server_changes_per_s:,.0f} | "
            f"{r.values_per_s:,.0f} | {r.overruns} | {cpu} |"
        )


if __name__ == "__main__":
    main()
