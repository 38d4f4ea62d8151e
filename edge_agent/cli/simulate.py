"""`simulate` (the pump skid over Modbus TCP, OPC UA and S7, or its data as CSV) and `demo` (the whole job)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
from pathlib import Path
from typing import Any

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _iso

# ---------------------------------------------------------------- simulate


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve the simulated pump skid."""
    from edge_agent import simulate

    if args.list_faults:
        for name, text in simulate.list_faults():
            print(f"{name:22} {text}")
        return EXIT_OK
    try:
        faults = tuple(simulate.parse_fault_spec(f) for f in args.fault)
    except ValueError as exc:
        print(f"--fault: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.record:
        if not args.duration:
            print("--record needs --duration SECONDS (plant time)", file=sys.stderr)
            return EXIT_CONFIG
        rows = record_plant(args.record, seed=args.seed, faults=faults, seconds=args.duration, every=args.record_every)
        print(f"{args.record}: {rows} rows of plant data ({args.duration:g} s, seed {args.seed})")
        return EXIT_OK
    try:
        ports = _ports(args, simulate.simulated_protocols())
        options = simulate.SimulatorOptions(
            host=args.host, ports=ports, seed=args.seed, faults=faults, state_dir=Path(args.state_dir)
        )
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def ready(lines: list[str]) -> None:
        for line in lines:
            print(line, flush=True)

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        if args.duration:
            loop.call_later(args.duration, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await simulate.run_simulator(options, on_ready=ready)

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _ports(args: argparse.Namespace, defaults: dict[str, int]) -> dict[str, int]:
    """Driver type → port: every simulated protocol on its default port, then --port, the aliases, --without."""
    ports = dict(defaults)
    for spec in args.port:
        key, sep, text = spec.partition("=")
        if not sep or not text.isdigit():
            raise ValueError(f"--port {spec!r}: write TYPE=PORT, e.g. modbus=5020 ({', '.join(defaults)})")
        ports[key] = int(text)
    for key in defaults:  # --modbus-port and the like: the historical spelling of --port
        port = getattr(args, f"{key}_port", None)
        if port is not None:
            ports[key] = port
    for key in [*args.without, *(["opcua"] if args.no_opcua else []), *(["s7"] if args.no_s7 else [])]:
        ports.pop(key, None)
    return ports


def record_plant(path: str, *, seed: int, faults: tuple[Any, ...], seconds: float, every: float) -> int:
    """Offline plant data as CSV: a datetime column and one column per signal, named like the example tags."""
    import csv

    from edge_agent.simulate import SIGNALS, Plant

    plant = Plant(seed=seed, faults=faults)
    stride = max(1, round(every / plant.dt))
    data = plant.run(int(seconds / plant.dt))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()  # fixed: the same seed gives the same file
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["datetime", *(f"pump.{name}" for name in SIGNALS), "fault_active"])
        for i in range(stride - 1, len(data["time"]), stride):
            row = [f"{data[name][i]:.6g}" for name in SIGNALS]
            w.writerow([_iso(start + float(data["time"][i])), *row, int(data["fault_active"][i])])
    return len(range(stride - 1, len(data["time"]), stride))


# ---------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """The simulator with a scheduled fault, the agent, a broker and a live subscriber view."""
    from edge_agent import demo

    if args.fault:
        try:
            demo.fault_window(args.fault)
        except ValueError as exc:
            print(f"--fault: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    opts = demo.DemoOptions(
        fault=args.fault,
        duration=args.duration,
        broker=args.broker,
        model=Path(args.model) if args.model else None,
        view=args.view,
        seed=args.seed,
        keep=args.keep,
        sparkplug=args.sparkplug,
    )
    try:
        return asyncio.run(demo.run_demo(opts))
    except demo.DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_FAIL


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of demo and simulate."""
    d = sub.add_parser("demo", help="the whole job on this machine: simulator, agent, broker and a live view")
    d.add_argument(
        "--fault",
        default="cavitation@30+40",
        metavar="NAME@SECONDS[+DURATION]",
        help="the simulator's scheduled fault (default cavitation@30+40; '' for none; see simulate --list-faults)",
    )
    d.add_argument("--duration", type=float, default=120.0, metavar="SECONDS", help="stop after this long (0: never)")
    d.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "builtin"],
        default="auto",
        help="auto: mosquitto when installed, else the in-process amqtt broker (pip install 'edge-agent[demo]')",
    )
    d.add_argument(
        "--sparkplug",
        action="store_true",
        help="the agent publishes Sparkplug B too (mqtt.payloads: [json, sparkplug], group demo)",
    )
    d.add_argument("--model", metavar="FILE", help="model bundle (default: the shipped models/pump-skid-ae.tflite)")
    d.add_argument(
        "--view",
        choices=["auto", "live", "plain"],
        default="auto",
        help="live: a full-screen view (needs rich); plain: event lines and a summary every 5 s",
    )
    d.add_argument("--seed", type=int, default=0, help="the simulator's random seed")
    d.add_argument("--keep", action="store_true", help="keep the config, outbox and logs (kept anyway on failure)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "simulate", help="serve a simulated pump skid over every protocol whose driver ships a simulator"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="TYPE=PORT",
        help="serve a protocol on this port (repeatable); defaults: modbus=5020, opcua=4840, s7=1102 (a PLC uses 102)",
    )
    s.add_argument(
        "--without", action="append", default=[], metavar="TYPE", help="do not serve this protocol (repeatable)"
    )
    # the historical spellings of --port TYPE=PORT and --without TYPE
    s.add_argument("--modbus-port", type=int, help="same as --port modbus=PORT")
    s.add_argument("--opcua-port", type=int, help="same as --port opcua=PORT")
    s.add_argument("--s7-port", type=int, help="same as --port s7=PORT")
    s.add_argument("--no-opcua", action="store_true", help="same as --without opcua")
    s.add_argument("--no-s7", action="store_true", help="same as --without s7")
    pki = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "edge-agent" / "simulator-pki"
    s.add_argument(
        "--state-dir",
        "--opcua-cert-dir",
        dest="state_dir",
        metavar="DIR",
        default=str(pki),
        help=f"files the servers keep across restarts (the OPC UA server's certificate, so agents can trust it; "
        f"default {pki})",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same signals")
    s.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME@SECONDS[+DURATION]",
        help="inject a fault, e.g. cavitation@30+60 (repeatable; see --list-faults)",
    )
    s.add_argument("--list-faults", action="store_true", help="list the faults and exit")
    s.add_argument("--record", metavar="CSV", help="write --duration seconds of plant data to a CSV (no server; fast)")
    s.add_argument("--record-every", type=float, default=1.0, metavar="SECONDS", help="sample interval of --record")
    s.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="stop after this long (0: never)")
    s.set_defaults(func=cmd_simulate)
