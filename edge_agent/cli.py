"""Command line: check | read | run | simulate."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.config import Config, load_config
from edge_agent.drivers import REGISTRY, DeviceBase
from edge_agent.errors import ConfigError, DeviceError, DeviceStartupError
from edge_agent.types import Quality, Sample, SampleBatch

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("edge_agent")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pymodbus logs every connection error itself; the poller reports each outage once
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.CRITICAL)


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        n = len(exc.issues)
        print(f"{path}: {n} error{'s' if n != 1 else ''}, nothing started", file=sys.stderr)
        return None


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config file without touching the network."""
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    n_tags = sum(len(d.tags) for d in cfg.devices)
    print(
        f"{args.config}: OK: {len(cfg.devices)} device{'s' if len(cfg.devices) != 1 else ''}, "
        f"{n_tags} tags, {len(cfg.models)} models"
    )
    for dev in cfg.devices:
        driver = REGISTRY[dev.type].factory(dev)
        plan = getattr(driver, "requests_per_cycle", {})
        per = ", ".join(
            f"{len(g.tags)} tags every {g.interval:g}s in {plan.get(g.interval, '?')} requests" for g in driver.groups
        )
        print(f"  {dev.name} ({dev.type}): {per}")
    return EXIT_OK


# ---------------------------------------------------------------- read


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


async def _read_device(dev: DeviceBase) -> tuple[list[Sample], str | None]:
    driver = REGISTRY[dev.type].factory(dev)
    samples: list[Sample] = []
    try:
        await driver.connect()
        for group in [*driver.groups, *getattr(driver, "subscriptions", [])]:
            async with asyncio.timeout(dev.timeout * (1 + len(group.tags) // 50) + 1.0):
                samples.extend((await driver.read(group)).samples())
        return samples, None
    except (DeviceError, TimeoutError) as exc:
        now = time.time()
        have = {s.tag for s in samples}
        samples.extend(Sample(dev.name, t.name, now, None, Quality.COMMS_LOST) for t in dev.tags if t.name not in have)
        return samples, str(exc) if isinstance(exc, DeviceError) else f"device {dev.name}: read timed out"
    finally:
        await driver.close()


def cmd_read(args: argparse.Namespace) -> int:
    """Read every tag once and print it (commissioning)."""
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    devices = [d for d in cfg.devices if args.device in (None, d.name)]
    if not devices:
        print(f"no device named {args.device!r}; devices: {', '.join(d.name for d in cfg.devices)}", file=sys.stderr)
        return EXIT_CONFIG

    async def read_all() -> list[tuple[list[Sample], str | None]]:
        return list(await asyncio.gather(*(_read_device(d) for d in devices)))

    results = asyncio.run(read_all())
    meta = {(d.name, t.name): (t, d) for d in devices for t in d.tags}
    rows: list[Sample] = []
    for samples, error in results:
        if error:
            print(error, file=sys.stderr)
        rows.extend(samples)
    if args.json:
        for s in rows:
            tag, _ = meta[(s.device, s.tag)]
            print(
                json.dumps(
                    {
                        "device": s.device,
                        "tag": s.tag,
                        "value": s.value,
                        "quality": s.quality.label,
                        "ts": _iso(s.ts),
                        "unit": tag.unit,
                        "address": str(getattr(tag, "address", "")),
                    }
                )
            )
    else:
        _print_table(rows, meta, sys.stdout)
    return EXIT_OK if all(s.quality is Quality.GOOD for s in rows) else EXIT_FAIL


def _print_table(rows: Sequence[Sample], meta: dict[tuple[str, str], Any], out: TextIO) -> None:
    table = [("DEVICE", "TAG", "VALUE", "UNIT", "QUALITY", "ADDRESS")]
    for s in rows:
        tag, _ = meta[(s.device, s.tag)]
        table.append(
            (s.device, s.tag, _fmt(s.value), tag.unit or "", s.quality.label, str(getattr(tag, "address", "")))
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Poll continuously until SIGINT/SIGTERM."""
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG

    def print_samples(batch: SampleBatch) -> None:
        for s in batch.samples():
            print(
                json.dumps(
                    {"device": s.device, "tag": s.tag, "value": s.value, "quality": s.quality.label, "ts": _iso(s.ts)}
                ),
                flush=False,
            )
        sys.stdout.flush()

    agent = Agent(cfg, on_batch=print_samples if args.output == "samples" else None)
    failed: list[BaseException] = []
    try:
        asyncio.run(_run_agent(agent, args))
    except* DeviceStartupError as group:
        failed.extend(_leaves(group))
    for exc in failed:
        log.error("%s; stopping (on_startup_error: error)", exc)
    return EXIT_FAIL if failed else EXIT_OK


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


async def _run_agent(agent: Agent, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    n_tags = sum(len(d.tags) for d in agent.config.devices)
    log.info("edge-agent %s: polling %d devices, %d tags", __version__, len(agent.pollers), n_tags)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(agent.run(stop), name="agent")
        if args.output == "summary":
            tg.create_task(_report(agent, stop, args.report_interval), name="report")


async def _report(agent: Agent, stop: asyncio.Event, interval: float) -> None:
    """Print one line per device every `interval` seconds: rates, errors and a few values."""
    last = {p.config.name: 0 for p in agent.pollers}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        for p in agent.pollers:
            s = p.stats
            rate = (s.reads - last[p.config.name]) / interval
            last[p.config.name] = s.reads
            state = "up" if s.connected else "DOWN"
            vals = []
            for tag in p.config.tags[:6]:
                latest = agent.buffers.latest(tag.name)
                if latest is not None:
                    _, v, q = latest
                    vals.append(f"{tag.name}={_fmt(v) if q is Quality.GOOD else q.label}")
            more = f" …+{len(p.config.tags) - 6}" if len(p.config.tags) > 6 else ""
            print(
                f"{p.config.name} {state} reads/s={rate:.1f} failures={s.failures} overruns={s.overruns} "
                f"| {' '.join(vals)}{more}",
                flush=True,
            )


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
    options = simulate.SimulatorOptions(host=args.host, modbus_port=args.modbus_port, seed=args.seed, faults=faults)

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


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a config file (exit 0 when valid, 2 when not)")
    c.add_argument("config")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("read", help="read every tag once and print it (exit 1 if any tag is not good)")
    r.add_argument("config")
    r.add_argument("--device", help="only this device")
    r.add_argument("--json", action="store_true", help="one JSON object per tag per line")
    r.set_defaults(func=cmd_read)

    u = sub.add_parser("run", help="poll continuously until SIGINT/SIGTERM")
    u.add_argument("config")
    u.add_argument(
        "--output",
        choices=["summary", "samples", "none"],
        default="summary",
        help="summary: a line per device every --report-interval; samples: every value as JSON",
    )
    u.add_argument("--report-interval", type=float, default=5.0, metavar="SECONDS")
    u.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="stop after this long (0: never)")
    u.set_defaults(func=cmd_run)

    s = sub.add_parser("simulate", help="serve a simulated pump skid over Modbus TCP")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--modbus-port", type=int, default=5020, help="Modbus TCP port (default 5020)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same signals")
    s.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME@SECONDS[+DURATION]",
        help="inject a fault, e.g. cavitation@30+60 (repeatable; see --list-faults)",
    )
    s.add_argument("--list-faults", action="store_true", help="list the faults and exit")
    s.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="stop after this long (0: never)")
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
