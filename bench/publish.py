"""Benchmark: what publishing costs on top of polling, in agent CPU µs per tag value.

10,000 float32 Modbus tags (20,000 holding registers of a pymodbus server in another process; every second
the server changes 10 % of them) polled every 1 s by the agent, publishing to a mosquitto subprocess.
Modes, each measured in the same run against the same server:

- `stdlib`: a bare stdlib Modbus TCP poller (socket + struct, the same 125-register reads) in a subprocess:
  the floor any Python poller pays;
- `poll`: the agent polling into its buffers, no MQTT (the reference the publishing modes are compared to);
- `json`: JSON telemetry of every tag every telemetry_interval (1 s);
- `rbe`: JSON telemetry by exception (integrity_interval 60 s): only the ~10 % of tags that changed;
- `spb`: Sparkplug B DDATA by exception (needs the Sparkplug sink: mqtt.payloads [sparkplug]; a branch
  without it reports the mode as unavailable).

CPU is the agent process's (process_time) over the measured seconds divided by the good values polled in
them; the broker and the server run in their own processes. Messages published are counted from the sink's
stats (no subscriber in the measured process).

    python bench/publish.py                          # every mode, 10,000 tags, 20 s each
    python bench/publish.py --modes poll json rbe --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from harness import cpu_model, free_port, machine_line, measure_agent, start_mosquitto, start_server, stop_process

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.errors import ConfigError

MODES = ("stdlib", "poll", "json", "rbe", "spb")
CHANGING = 0.10  # share of tags the server changes every second (--changing)
READ = 124  # registers per request: 62 float32 tags (the agent's planner packs the same)


def serve(port: int, n_tags: int, changing: float) -> None:
    """Server mode: n_tags float32 in holding registers; every second a `changing` share of them get a new value."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    rng = random.Random(0)
    table = [0] * (2 * n_tags)

    def put(i: int) -> None:
        table[2 * i], table[2 * i + 1] = struct.unpack(">HH", struct.pack(">f", rng.uniform(0, 1000)))

    for i in range(n_tags):
        put(i)

    async def action(fc: int, start: int, address: int, count: int, current: list[int], _set: object) -> None:
        off = address - start
        current[off : off + count] = table[address : address + count]

    async def change() -> None:
        while True:
            await asyncio.sleep(1.0)
            for i in rng.sample(range(n_tags), int(n_tags * changing)):
                put(i)

    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    regs = [SimData(0, count=2 * n_tags, values=0, datatype=DataType.REGISTERS)]
    device = SimDevice(
        1, simdata=(bits, bits, regs, [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]), action=action
    )

    async def main() -> None:
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        task = asyncio.create_task(change())
        try:
            await server.serve_forever()
        finally:
            task.cancel()

    asyncio.run(main())


def stdlib_poller(port: int, n_tags: int, duration: float, settle: float) -> None:
    """Poller mode: read every tag each second with plain sockets; print `values cpu_seconds` of the measured part."""
    sock = __import__("socket").create_connection(("127.0.0.1", port))
    tid = 0
    latest: list[float] = [0.0] * n_tags

    def read(address: int, count: int) -> tuple[float, ...]:
        nonlocal tid
        tid = (tid + 1) & 0xFFFF
        sock.sendall(struct.pack(">HHHBBHH", tid, 0, 6, 1, 3, address, count))
        need, data = 9 + 2 * count, b""
        while len(data) < need:
            chunk = sock.recv(need - len(data))
            if not chunk:
                raise SystemExit("the server closed the connection")
            data += chunk
        return struct.unpack(f">{count // 2}f", data[9:])

    start = time.monotonic()
    values, cpu0 = 0, time.process_time()
    for cycle in range(int(settle) + int(duration)):  # one cycle a second; the first `settle` are not counted
        time.sleep(max(0.0, start + cycle - time.monotonic()))
        if cycle == int(settle):
            values, cpu0 = 0, time.process_time()
        for first in range(0, 2 * n_tags, READ):
            got = read(first, min(READ, 2 * n_tags - first))
            latest[first // 2 : first // 2 + len(got)] = got
            values += len(got)
    print(values, time.process_time() - cpu0)


def config_text(port: int, n_tags: int, mode: str, mqtt_port: int, outbox: Path) -> str:
    """The agent's config for a mode."""
    lines = [
        "devices:",
        "  - name: bench",
        "    type: modbus",
        "    host: 127.0.0.1",
        f"    port: {port}",
        "    poll_interval: 1s",
        "    timeout: 2s",
    ]
    if mode in ("rbe", "spb"):
        lines.append("    integrity_interval: 60s")
    lines.append("    tags:")
    lines += [f'      - {{name: t{i}, address: "holding:{2 * i}", type: float32, unit: bar}}' for i in range(n_tags)]
    if mode != "poll":
        lines += [
            "mqtt:",
            f"  url: mqtt://127.0.0.1:{mqtt_port}",
            "  telemetry_interval: 1s",
        ]
        if mode == "spb":
            lines += ["  payloads: [sparkplug]", "  sparkplug: {group_id: bench}"]
        lines += ["outbox:", f"  path: {outbox}"]
    return "\n".join(lines) + "\n"


@dataclass
class Row:
    mode: str
    values_per_s: float
    cpu_us_per_value: float
    messages: int | None
    note: str = ""


async def measure(args: argparse.Namespace, port: int, mode: str, mqtt_port: int, workdir: Path) -> Row:
    """One mode against the running server and broker."""
    if mode == "stdlib":
        cmd = [sys.executable, __file__, "--stdlib", str(port), "--tags", str(args.tags)]
        cmd += ["--duration", str(args.duration)]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the stdlib poller failed (exit {proc.returncode})")
        out = stdout.decode().split()
        values, cpu = int(out[0]), float(out[1])
        return Row(mode, values / args.duration, 1e6 * cpu / max(values, 1), None)
    try:
        cfg = parse_config(config_text(port, args.tags, mode, mqtt_port, workdir / f"{mode}.db"))
    except ConfigError as exc:
        return Row(mode, 0.0, float("nan"), None, f"unavailable on this branch: {str(exc).splitlines()[0]}")
    seen: list[tuple[Agent, int]] = []  # the agent and what its sink had published when the measurement began

    def mark(agent: Agent) -> None:
        if agent.sink is not None:
            seen.append((agent, agent.sink.stats().published))

    m = await measure_agent(cfg, duration=args.duration, settle=3.0, after_settle=mark)
    messages = None
    for agent, before in seen:
        if agent.sink is not None:
            messages = agent.sink.stats().published - before
    print(f"  {mode}: {m.values} values, {messages} messages", file=sys.stderr, flush=True)
    return Row(mode, m.values_per_s, m.cpu_us_per_value, messages)


async def run(args: argparse.Namespace) -> list[Row]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--tags", str(args.tags), "--changing", str(args.changing)]
    server = start_server(cmd, port)
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        broker, mqtt_port = start_mosquitto(tmp)
        try:
            return [await measure(args, port, mode, mqtt_port, Path(tmp)) for mode in args.modes]
        finally:
            stop_process(broker)
            stop_process(server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stdlib", type=int, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per mode")
    p.add_argument("--tags", type=int, default=10_000)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--changing", type=float, default=CHANGING, help="share of tags changing per second")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.tags, args.changing)
        return
    if args.stdlib:
        stdlib_poller(args.stdlib, args.tags, args.duration, settle=3.0)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    rows = asyncio.run(run(args))
    print(machine_line("pymodbus", args.duration) + f"; CPU: {cpu_model()}")
    print(
        f"{args.tags} float32 tags polled every 1 s, {args.changing:.0%} of them changing per second; "
        "mosquitto in another process"
    )
    ref = next((r for r in rows if r.mode == "poll"), None)
    base = next((r for r in rows if r.mode == "stdlib"), None)
    print("| mode | values/s | messages | CPU µs/value | × agent polling | × stdlib poller | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_ref = f"{r.cpu_us_per_value / ref.cpu_us_per_value:.2f}" if ref and ref.cpu_us_per_value > 0 else "–"
        vs_base = f"{r.cpu_us_per_value / base.cpu_us_per_value:.2f}" if base and base.cpu_us_per_value > 0 else "–"
        msgs = "–" if r.messages is None else str(r.messages)
        cpu = f"{r.cpu_us_per_value:.2f}"
        print(f"| {r.mode} | {r.values_per_s:,.0f} | {msgs} | {cpu} | {vs_ref} | {vs_base} | {r.note} |")


if __name__ == "__main__":
    main()
