"""`run`: poll and score until SIGINT/SIGTERM, with a summary line per device and model every few seconds;
SIGHUP (or an edit of the config file) reloads the config live.

And the live collection behind `calibrate --config`, which runs the agent the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _fmt, _iso, _load_with_models, log
from edge_agent.errors import DeviceStartupError

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.config import Config
    from edge_agent.types import AnomalyEvent, SampleBatch

# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Poll and score continuously until SIGINT/SIGTERM; anomaly events go to stdout as JSON lines."""
    from edge_agent.agent import Agent
    from edge_agent.records import event_payload
    from edge_agent.reload import WATCH_INTERVAL

    cfg, models = _load_with_models(args.config)
    if cfg is None:
        return EXIT_CONFIG

    def print_event(event: AnomalyEvent) -> None:
        if cfg.mqtt is None:  # with MQTT configured the events go to the broker, through the outbox
            print(json.dumps(event_payload(event)), flush=True)
        log.warning(
            "model %s: %s %s score %.3g (threshold %.3g), top %s",
            event.model,
            event.type.value,
            event.severity.value,
            event.score,
            event.threshold,
            ", ".join(f"{k} {v:.0%}" for k, v in event.contributions.items()),
        )

    def print_samples(batch: SampleBatch) -> None:
        for s in batch.samples():
            print(
                json.dumps(
                    {"device": s.device, "tag": s.tag, "value": s.value, "quality": s.quality.label, "ts": _iso(s.ts)}
                ),
                flush=False,
            )
        sys.stdout.flush()

    if cfg.observe.log_format == "json":
        from edge_agent.observe import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    from edge_agent.drivers import DriverUnavailable

    try:
        agent = Agent(
            cfg,
            on_batch=print_samples if args.output == "samples" else None,
            on_event=print_event,
            models=models,
            source=args.config,
            watch_interval=WATCH_INTERVAL if args.watch_interval is None else args.watch_interval,
        )
    except DriverUnavailable as exc:  # a protocol library is not installed: nothing starts
        log.error("%s: %s; nothing started (edge-agent check lists every such device)", args.config, exc)
        return EXIT_CONFIG
    from edge_agent.publish import MqttSetupError, OutboxError

    failed: list[str] = []
    try:
        asyncio.run(_run_agent(agent, args))
    except* DeviceStartupError as group:
        failed.extend(f"{e}; stopping (on_startup_error: error)" for e in _leaves(group))
    except* (OutboxError, MqttSetupError) as group:
        failed.extend(str(e) for e in _leaves(group))
    for err in failed:
        log.error("%s", err)
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
    loop.add_signal_handler(signal.SIGHUP, agent.request_reload)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    n_tags = sum(len(d.tags) for d in agent.config.devices)
    log.info("edge-agent %s: polling %d devices, %d tags", __version__, len(agent.config.devices), n_tags)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(agent.run(stop), name="agent")
        if args.output == "summary":
            tg.create_task(_report(agent, stop, args.report_interval), name="report")


async def _report(agent: Agent, stop: asyncio.Event, interval: float) -> None:
    """Print one line per device every `interval` seconds: rates, errors and a few values."""
    from edge_agent.types import Quality

    last: dict[str, tuple[int, int]] = {}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        stats = agent.stats()
        tags = {d.name: d.tags for d in agent.config.devices}  # a reload may add or change devices
        for s in stats.devices:
            reads0, pushed0 = last.get(s.device, (0, 0))
            rate = (s.reads - reads0) / interval
            pushed = f" pushed/s={(s.pushed - pushed0) / interval:.1f}" if s.pushed else ""
            last[s.device] = (s.reads, s.pushed)
            state = "up" if s.connected else "DOWN"
            vals = []
            for tag in tags[s.device][:6]:
                latest = agent.latest(tag.name)
                if latest is not None:
                    _, v, q = latest
                    vals.append(f"{tag.name}={_fmt(v) if q is Quality.GOOD else q.label}")
            n = len(tags[s.device])
            more = f" …+{n - 6}" if n > 6 else ""
            print(
                f"{s.device} {state} reads/s={rate:.1f}{pushed} failures={s.failures} overruns={s.overruns} "
                f"| {' '.join(vals)}{more}",
                flush=True,
            )
        for m in stats.models:
            state = {"insufficient": "insufficient data", "anomaly": "ANOMALY"}.get(m.state, m.state)
            score = "-" if m.last_score is None else f"{m.last_score:.3g}"
            print(
                f"model {m.model} {state} score={score} threshold={m.threshold:.3g} windows={m.windows_scored}",
                flush=True,
            )


async def _collect_live(cfg: Config, inputs: list[str], interval: float, samples: int) -> Any:
    """Poll the configured devices until `samples` grid points of every input are good; rows × inputs."""
    from edge_agent.agent import Agent

    missing = [t for t in inputs if t not in {tag.name for d in cfg.devices for tag in d.tags}]
    if missing:
        print(f"calibrate: the config has no tag {', '.join(missing)}", file=sys.stderr)
        return None
    span = interval * (samples + 2)
    cfg = cfg.model_copy(
        update={
            "buffers": cfg.buffers.model_copy(
                update={"retention": max(cfg.buffers.retention, span * 1.2), "max_samples_per_tag": 1_000_000}
            )
        }
    )
    agent = Agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    log.info("calibrate: collecting %d samples every %gs (%.0fs) of normal operation", samples, interval, span)
    try:
        await asyncio.sleep(span)
        t_end = (time.time() // interval) * interval
        w = agent.window(inputs, t_end=t_end, interval=interval, n_samples=samples)
    finally:
        stop.set()
        await task
    good_rows = w.good.all(axis=1)
    if good_rows.mean() < 0.9:
        print(f"calibrate: only {good_rows.mean():.0%} of the samples were good; is every device up?", file=sys.stderr)
        return None
    return w.values[good_rows].astype("float64")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of run."""
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
    u.add_argument(
        "--watch-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="look at the config file (and its model bundles) this often and reload when they change "
        "(default: every few seconds; 0: only on SIGHUP)",
    )
    u.set_defaults(func=cmd_run)
