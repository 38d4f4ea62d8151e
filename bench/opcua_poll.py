"""Benchmark: the agent reading many OPC UA tags from an asyncua server in another process, read vs subscribe.

Prints, per case: Read requests per cycle, tag values/s delivered to the buffers, overruns, and the
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
from edge_agent.drivers.opcua import OpcUaDriver
from edge_agent.types import SampleBatch

NAMESPACE = "urn:edge-agent:bench"
# what a plant's tag list looks like: mostly analog values, some counters and states
TYPES = ["Double"] * 6 + ["Float"] * 2 + ["Int32", "Boolean"]


def serve(port: int, n_tags: int, period: float) -> None:
    """Server mode: n_tags variables whose values all change every `period` seconds."""
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
        while True:
            await asyncio.sleep(period)
            k += 1
            for nodeid, vt in nodes:
                if vt is ua.VariantType.Boolean:
                    v: object = k % 2 == 0
                elif vt is ua.VariantType.Int32:
                    v = k
                else:
                    v = rng.random() * 100.0
                await server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(v, vt)))

    asyncio.run(main())


def config_text(port: int, n_tags: int, interval: float, mode: str) -> str:
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
    lines += [f'      - {{name: t{i}, node: "nsu={NAMESPACE};s=T{i}"}}' for i in range(n_tags)]
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


async def measure(port: int, n_tags: int, interval: float, mode: str, duration: float) -> Row:
    cfg = parse_config(config_text(port, n_tags, interval, mode))
    good = 0

    def count(batch: SampleBatch) -> None:
        nonlocal good
        good += int((batch.quality == 0).sum())

    agent = Agent(cfg, on_batch=count)
    driver = agent.pollers[0].driver
    assert isinstance(driver, OpcUaDriver)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.sleep(min(3.0, duration / 3))  # connect, subscribe and settle
    good0, cpu0, wall0 = good, time.process_time(), time.perf_counter()
    over0 = agent.pollers[0].stats.overruns
    await asyncio.sleep(duration)
    good1, cpu1, wall1 = good, time.process_time(), time.perf_counter()
    overruns = agent.pollers[0].stats.overruns - over0
    requests = sum(driver.requests_per_cycle.values())
    stop.set()
    await task
    values = good1 - good0
    print(f"  measured {n_tags} tags at {interval:g}s, {mode}: {values} values", file=sys.stderr, flush=True)
    return Row(
        n_tags, interval, mode, requests, values / (wall1 - wall0), overruns, 1e6 * (cpu1 - cpu0) / max(values, 1)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            if server.poll() is not None:
                raise SystemExit("the benchmark server did not start") from None
            await asyncio.sleep(0.1)
    raise SystemExit("the benchmark server did not listen within 30 s")


async def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    for n in args.tags:
        port = free_port()
        cmd = [sys.executable, __file__, "--serve", str(port), "--serve-tags", str(n), "--update", str(args.update)]
        server = subprocess.Popen(cmd)  # noqa: ASYNC220 (started once per tag count)
        try:
            await wait_for_port(port, server)
            for interval in (1.0, args.fast):
                for mode in ("read", "subscribe"):
                    rows.append(await measure(port, n, interval, mode, args.duration))
        finally:
            server.terminate()
            server.wait(10)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-tags", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--tags", type=int, nargs="+", default=[1000])
    p.add_argument("--fast", type=float, default=0.1, help="interval of the fast cases (seconds)")
    p.add_argument("--update", type=float, default=0.1, help="how often the server changes every value (seconds)")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.serve_tags, args.update)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    rows = asyncio.run(run(args))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.platform()}; server: asyncua in another process, every value changing every "
        f"{args.update:g} s; {args.duration:g} s per case"
    )
    head = ("tags", "interval", "mode", "Read requests/cycle", "values/s", "overruns", "CPU µs/value")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        req = str(r.requests) if r.mode == "read" else "-"
        cpu = f"{r.cpu_us_per_value:.2f}" if math.isfinite(r.cpu_us_per_value) else "-"
        print(f"| {r.tags} | {r.interval:g}s | {r.mode} | {req} | {r.values_per_s:,.0f} | {r.overruns} | {cpu} |")


if __name__ == "__main__":
    main()
