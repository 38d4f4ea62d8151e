"""Command line: check | read | run | demo | simulate | opcua | outbox | model | calibrate | replay | train."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.config import Config, load_config
from edge_agent.drivers import REGISTRY, DeviceBase, DriverUnavailable
from edge_agent.errors import ConfigError, DeviceError, DeviceStartupError
from edge_agent.scoring.monitor import LoadedModel, load_models
from edge_agent.types import AnomalyEvent, Quality, Sample, SampleBatch

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("edge_agent")


# a password in a protocol object's repr (asyncua's UserNameIdentityToken: Password=b'…') or a dict ('password': '…')
_SECRET = re.compile(
    r"""(?i)(\w*(?:password|passwd)\w*=|['"]\w*(?:password|passwd)\w*['"]\s*:\s*)"""
    r"""(b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*")"""
)


class RedactSecrets(logging.Filter):
    """Blank out passwords in every record, whichever library logged it (the last guard; log levels are the first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message when it shows a password; never drops a record."""
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: the formatter reports it, a filter must not raise
            return True
        clean = _SECRET.sub(r"\1'***'", text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_REDACT = RedactSecrets()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_REDACT)  # on the handlers: a logger's filter does not see its children's records
    debug = level.upper() == "DEBUG"
    # pymodbus logs every connection error itself; the poller reports each outage once
    logging.getLogger("pymodbus").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    # the protocol libraries log every session and socket at INFO; our own lines say what matters
    for name in ("asyncua", "snap7"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    # asyncua's client logs every request and answer whole at DEBUG, the session's user identity token
    # (user name and password) included: never wanted, whatever the level
    logging.getLogger("asyncua.client.ua_client").setLevel(logging.INFO if debug else logging.WARNING)


def _load(path: str) -> Config | None:
    """The config, or None after printing every problem in it."""
    return _load_with_models(path, models=False)[0]


def _load_with_models(path: str, *, models: bool = True) -> tuple[Config | None, list[LoadedModel]]:
    """The config and its model bundles loaded once (each builds an interpreter), or None after printing why."""
    try:
        cfg = load_config(path)
        return cfg, load_models(cfg) if models else []
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        n = len(exc.issues)
        print(f"{path}: {n} error{'s' if n != 1 else ''}, nothing started", file=sys.stderr)
        return None, []


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a config file and its model bundles without touching the network."""
    cfg, models = _load_with_models(args.config)
    if cfg is None:
        return EXIT_CONFIG
    n_tags = sum(len(d.tags) for d in cfg.devices)
    print(
        f"{args.config}: OK: {len(cfg.devices)} device{'s' if len(cfg.devices) != 1 else ''}, "
        f"{n_tags} tags, {len(cfg.models)} models"
    )
    for dev in cfg.devices:
        try:
            driver = REGISTRY[dev.type].build(dev)
        except DriverUnavailable as exc:
            print(f"  {dev.name} ({dev.type}): {exc}")
            continue
        print(f"  {dev.name} ({dev.type}): {', '.join(driver.plan())}")
    for m in models:  # which file will score: the configured one, or a saved startup calibration of it
        print(f"  model {m.section.name}: {m.describe()}")
    return EXIT_OK


# ---------------------------------------------------------------- read


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # counters and the like arrive as whole floats from the buffers: print them whole
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


async def _read_device(dev: DeviceBase) -> tuple[list[Sample], str | None]:
    driver = REGISTRY[dev.type].build(dev)
    samples: list[Sample] = []
    try:
        await driver.connect()
        for group in [*driver.groups, *driver.subscriptions]:
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
                        "value": tag.json_value(s.value),
                        "quality": s.quality.label,
                        "ts": _iso(s.ts),
                        "unit": tag.unit,
                        "address": tag.where(),
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
        table.append((s.device, s.tag, _fmt(s.value), tag.unit or "", s.quality.label, tag.where()))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Poll and score continuously until SIGINT/SIGTERM; anomaly events go to stdout as JSON lines."""
    from edge_agent.records import event_payload

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
    agent = Agent(
        cfg, on_batch=print_samples if args.output == "samples" else None, on_event=print_event, models=models
    )
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
    last = {d.name: (0, 0) for d in agent.config.devices}
    tags = {d.name: d.tags for d in agent.config.devices}
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        stats = agent.stats()
        for s in stats.devices:
            reads0, pushed0 = last[s.device]
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
    options = simulate.SimulatorOptions(
        host=args.host,
        modbus_port=args.modbus_port,
        seed=args.seed,
        faults=faults,
        opcua_port=None if args.no_opcua else args.opcua_port,
        s7_port=None if args.no_s7 else args.s7_port,
        opcua_cert_dir=Path(args.opcua_cert_dir),
    )

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


# ---------------------------------------------------------------- model, calibrate, replay, train


def cmd_model_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's metadata, tensors and sha256."""
    from edge_agent.scoring.bundle import ModelError, load_bundle
    from edge_agent.scoring.runtime import ModelRuntime

    try:
        bundle = load_bundle(args.file)
        tensors = ModelRuntime(bundle).describe()
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    info = {
        "file": str(args.file),
        "sha256": bundle.sha256,
        "bytes": len(bundle.data),
        **tensors,
        "metadata": bundle.metadata.model_dump(mode="json"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    m = bundle.metadata
    print(
        f"{args.file}\n  sha256     {bundle.sha256}\n  size       {len(bundle.data)} bytes\n"
        f"  model      {m.name} v{m.version}  {m.description}\n"
        f"  runtime    {tensors['runtime']}\n"
        f"  input      {tensors['input']['shape']} {tensors['input']['dtype']} "
        f"(scale {tensors['input']['scale']:.6g}, zero point {tensors['input']['zero_point']})\n"
        f"  output     {tensors['output']['shape']} {tensors['output']['dtype']} "
        f"(scale {tensors['output']['scale']:.6g}, zero point {tensors['output']['zero_point']})\n"
        f"  window     {m.window} samples every {m.sample_interval:g}s\n"
        f"  score      {m.score.kind}, smoothing {m.score.smoothing}\n"
        f"  threshold  {m.threshold.value:.6g} ({m.threshold.method}: q{m.threshold.quantile} × {m.threshold.margin}"
        f", {m.threshold.rows} rows of {m.threshold.calibrated_on or '?'} at {m.threshold.calibrated_at or '?'}"
        + (f", calibrated from sha256 {m.threshold.base_sha256[:12]}…" if m.threshold.base_sha256 else "")
        + ")\n"
        f"  detector   exit ratio {m.detector.exit_ratio}, min duration {m.detector.min_duration:g}s\n"
        f"  created    {m.created}\n  inputs"
    )
    for tag, mean, scale in zip(m.inputs, m.normalisation.mean, m.normalisation.scale, strict=True):
        print(f"    {tag:32} mean {mean:12.6g}  scale {scale:10.6g}")
    if m.training:
        print("  training   " + ", ".join(f"{k}={v}" for k, v in m.training.items()))
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Learn normalisation and threshold from normal data (a CSV, or the live machine) into a new bundle."""
    from edge_agent.scoring.bundle import ModelError, load_bundle, save_bundle
    from edge_agent.scoring.calibrate import calibrate
    from edge_agent.scoring.replay import read_table

    try:
        bundle = load_bundle(args.model)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    inputs = bundle.metadata.inputs
    if args.csv:
        try:
            data = read_table(args.csv).select(inputs)
        except ValueError as exc:
            print(f"calibrate: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if args.rows:
            data = data[: args.rows]
        source = f"{args.csv} ({len(data)} rows)"
    else:
        cfg = _load(args.config)
        if cfg is None:
            return EXIT_CONFIG
        data = asyncio.run(_collect_live(cfg, inputs, bundle.metadata.sample_interval, args.samples))
        if data is None:
            return EXIT_FAIL
        source = f"live {args.config} ({len(data)} samples)"
    try:
        new = calibrate(bundle, data, quantile=args.quantile, margin=args.margin, source=source)
    except ModelError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"calibrate: {args.csv or args.config}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        save_bundle(new, args.out)
    except OSError as exc:
        print(f"calibrate: {args.out}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    t = new.metadata.threshold
    print(f"{args.out}: threshold {t.value:.6g} (q{t.quantile} × {t.margin} of {len(data)} rows), sha256 {new.sha256}")
    return EXIT_OK


async def _collect_live(cfg: Config, inputs: list[str], interval: float, samples: int) -> Any:
    """Poll the configured devices until `samples` grid points of every input are good; rows × inputs."""
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


def _seconds(text: str) -> float:
    """A duration argument: seconds, or 500ms, 5s, 2m as in a config file."""
    from edge_agent.fields import parse_duration

    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _threshold(text: str) -> float | None:
    """A threshold argument: a positive number, or auto (the bundle's)."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is a positive number (or auto)")
    return value


def _exit_ratio(text: str) -> float:
    """An exit ratio argument: 0 < ratio ≤ 1, as models[].hysteresis.exit_ratio."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an exit ratio is a number above 0 and at most 1")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    """Run a CSV through buffers, scoring and the detector; write scores and anomaly flags."""
    from edge_agent.scoring.bundle import ModelError, load_bundle
    from edge_agent.scoring.replay import read_table, replay, write_result

    try:
        bundle = load_bundle(args.model)
        table = read_table(args.data)
        data = table.select(bundle.metadata.inputs)
    except (ModelError, ValueError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = replay(
            bundle,
            table.times,
            data,
            calibrate_rows=args.calibrate_rows,
            quantile=args.quantile,
            margin=args.margin,
            threshold=args.threshold,
            exit_ratio=args.exit_ratio,
            min_duration=args.min_duration,
            source=str(args.data),
        )
    except (ModelError, ValueError) as exc:  # the runtime finds some model problems only when it loads it
        print(f"replay: {args.data}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.out:
            write_result(result, args.out, table.time_column, table.stamps)
    except OSError as exc:
        print(f"replay: {args.out}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot:
        from edge_agent.scoring.plot import plot_replay

        try:
            plot_replay(result, table.times, data, bundle.metadata.inputs, args.plot, title=str(args.data))
        except (ValueError, OSError) as exc:
            print(f"replay: --plot: {exc}", file=sys.stderr)
            return EXIT_FAIL
    n_anom = int(result.anomaly.sum())
    spans = int(((result.anomaly[1:] == 1) & (result.anomaly[:-1] == 0)).sum() + result.anomaly[:1].sum())
    print(
        f"{args.data}: {len(result.times)} rows, threshold {result.threshold:.6g}, "
        f"{spans} anomalies covering {n_anom} rows" + (f" → {args.out}" if args.out else "")
    )
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Train an int8 bundle from CSVs of normal operation (needs the train extra)."""
    from edge_agent.scoring.bundle import ModelError, save_bundle
    from edge_agent.scoring.replay import read_table
    from edge_agent.scoring.train import TrainOptions, train

    try:
        tables = [read_table(p) for p in args.data]
        inputs = (
            args.inputs.split(",")
            if args.inputs
            else [c for c in tables[0].columns if c.lower() not in ("anomaly", "changepoint", "fault_active")]
        )
        series = [t.select(inputs) for t in tables]
    except ValueError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        series = [s[: args.rows] if args.rows else s for s in series]
        options = TrainOptions(
            name=args.name,
            inputs=tuple(inputs),
            window=args.window,
            sample_interval=args.sample_interval,
            hidden=args.hidden,
            bottleneck=args.bottleneck,
            epochs=args.epochs,
            seed=args.seed,
            dtype=args.dtype,
            quantile=args.quantile,
            margin=args.margin,
            description=args.description,
            normalise=args.normalise,
            segment_rows=args.segment_rows,
            smoothing=args.smoothing,
            exit_ratio=args.exit_ratio,
            min_duration=args.min_duration,
        )
        bundle = train(series, options, source=", ".join(Path(p).name for p in args.data))
    except (ModelError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        save_bundle(bundle, args.out)
    except OSError as exc:
        print(f"train: {args.out}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"{args.out}: {options.dtype} {bundle.metadata.training['architecture']}, threshold "
        f"{bundle.metadata.threshold.value:.6g}, sha256 {bundle.sha256}"
    )
    return EXIT_OK


def cmd_opcua_gen_cert(args: argparse.Namespace) -> int:
    """Make a self-signed client certificate whose application URI matches what the agent sends."""
    from edge_agent.drivers.opcua.certs import generate_certificate

    try:
        info = generate_certificate(
            Path(args.cert),
            Path(args.key),
            application_uri=args.application_uri,
            hostname=args.hostname,
            days=args.days,
            overwrite=args.force,
        )
    except (FileExistsError, OSError, ValueError) as exc:
        print(f"gen-cert: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"certificate {args.cert}\nprivate key {args.key} (mode 0600)")
    print(
        f"application URI {info.application_uri}, thumbprint {info.thumbprint}, valid until {info.not_after:%Y-%m-%d}"
    )
    print("put certificate/private_key under security: in the device, and trust the certificate on the server")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    """Operators' view of an outbox: stats, export, drain."""
    from edge_agent.publish import OutboxError, drain, export, outbox_stats

    try:
        if args.outbox_command == "stats":
            st = outbox_stats(args.path)
            if args.json:
                print(json.dumps(st.as_dict(), indent=2))
            else:
                oldest = "-" if st.oldest is None else _iso(st.oldest)
                print(
                    f"{st.path}: {st.total} messages ({', '.join(f'{k} {v}' for k, v in st.depth.items())}), "
                    f"{st.bytes} of {st.max_bytes} bytes, oldest {oldest}, open anomalies {st.open_anomalies}"
                )
                print(
                    f"  dropped: {', '.join(f'{k} {v}' for k, v in st.dropped_by_kind().items())}; "
                    f"last event seq {st.last_seq}"
                )
            return EXIT_OK
        if args.outbox_command == "export":
            if args.out in (None, "-"):
                n = export(args.path, sys.stdout)
            else:
                with open(args.out, "w", encoding="utf-8") as f:
                    n = export(args.path, f)
            print(f"{n} messages exported", file=sys.stderr)
            return EXIT_OK
        cfg = _load(args.config)
        if cfg is None:
            return EXIT_CONFIG
        if cfg.mqtt is None:
            print(f"{args.config}: no mqtt section: nowhere to drain to", file=sys.stderr)
            return EXIT_CONFIG
        result = asyncio.run(
            drain(
                cfg.mqtt,
                cfg.outbox,
                agent_id=cfg.agent.id,
                site=cfg.agent.site,
                version=__version__,
                max_seconds=args.timeout or None,
            )
        )
        print(f"{result.sent} sent, {result.left} left, {result.seconds:.1f} s")
        return EXIT_OK if result.complete else EXIT_FAIL
    except OutboxError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return EXIT_FAIL


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
    )
    try:
        return asyncio.run(demo.run_demo(opts))
    except demo.DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return EXIT_FAIL


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

    s = sub.add_parser("simulate", help="serve a simulated pump skid over Modbus TCP, OPC UA and S7")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--modbus-port", type=int, default=5020, help="Modbus TCP port (default 5020)")
    s.add_argument("--opcua-port", type=int, default=4840, help="OPC UA port (default 4840)")
    s.add_argument("--s7-port", type=int, default=1102, help="S7 (ISO-on-TCP) port (default 1102; a PLC uses 102)")
    s.add_argument("--no-opcua", action="store_true", help="do not serve OPC UA")
    s.add_argument("--no-s7", action="store_true", help="do not serve S7")
    pki = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "edge-agent" / "simulator-pki"
    s.add_argument(
        "--opcua-cert-dir",
        metavar="DIR",
        default=str(pki),
        help=f"the OPC UA server's certificate, kept across restarts so agents can trust it (default {pki})",
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

    o = sub.add_parser("opcua", help="OPC UA helpers")
    osub = o.add_subparsers(dest="opcua_command", required=True)
    g = osub.add_parser("gen-cert", help="make a self-signed client certificate and key for OPC UA security")
    g.add_argument("--cert", required=True, help="certificate file (.der, or .pem)")
    g.add_argument("--key", required=True, help="private key file (PEM)")
    host = socket.gethostname()
    g.add_argument("--application-uri", default=f"urn:{host}:edge-agent", help="default urn:HOSTNAME:edge-agent")
    g.add_argument("--hostname", default=host, help=f"DNS name in the certificate (default {host})")
    g.add_argument("--days", type=int, default=730)
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.set_defaults(func=cmd_opcua_gen_cert)

    ob = sub.add_parser("outbox", help="inspect, export or drain the durable outbox")
    obsub = ob.add_subparsers(dest="outbox_command", required=True)
    st = obsub.add_parser("stats", help="depth, bytes, oldest message and drops (safe while the agent runs)")
    st.add_argument("path", help="the outbox file (outbox.path in the config)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_outbox)
    ex = obsub.add_parser("export", help="every stored message as JSON lines (safe while the agent runs)")
    ex.add_argument("path")
    ex.add_argument("--out", help="file to write (default stdout)")
    ex.set_defaults(func=cmd_outbox)
    dr = obsub.add_parser("drain", help="publish everything in the outbox to the config's broker, then exit")
    dr.add_argument("config")
    dr.add_argument("--timeout", type=float, default=0, metavar="SECONDS", help="give up after this long (0: never)")
    dr.set_defaults(func=cmd_outbox)

    m = sub.add_parser("model", help="model bundles")
    msub = m.add_subparsers(dest="model_command", required=True)
    mi = msub.add_parser("inspect", help="print a bundle's metadata, tensor shapes/types and sha256")
    mi.add_argument("file")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=cmd_model_inspect)

    c = sub.add_parser("calibrate", help="learn normalisation and threshold from normal data into a new bundle")
    c.add_argument("--model", required=True, help="the bundle to adapt")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="normal operation as CSV (datetime column + the model's input columns)")
    src.add_argument("--config", help="poll the live machine described by this config")
    c.add_argument("--rows", type=int, default=0, help="use only the first N rows of the CSV")
    c.add_argument("--samples", type=int, default=600, help="live: samples on the model's grid to collect")
    c.add_argument("--quantile", type=float, default=0.99)
    c.add_argument("--margin", type=float, default=1.5, help="threshold = quantile of normal scores × margin")
    c.add_argument("--out", required=True, help="the new bundle")
    c.set_defaults(func=cmd_calibrate)

    rp = sub.add_parser("replay", help="score a CSV offline through the agent's own path")
    rp.add_argument("data")
    rp.add_argument("--model", required=True)
    rp.add_argument(
        "--calibrate-rows",
        type=int,
        default=0,
        metavar="N",
        help="calibrate normalisation and threshold on the first N rows first",
    )
    rp.add_argument("--quantile", type=float, default=0.99)
    rp.add_argument("--margin", type=float, default=1.5)
    # the overrides a config's models[] entry can make, so a replay matches a configured model
    rp.add_argument(
        "--threshold", type=_threshold, metavar="X|auto", help="as models[].threshold (default auto: the bundle's)"
    )
    rp.add_argument(
        "--exit-ratio", type=_exit_ratio, metavar="R", help="as models[].hysteresis.exit_ratio (default: the bundle's)"
    )
    rp.add_argument(
        "--min-duration", type=_seconds, metavar="SECONDS", help="as models[].hysteresis.min_duration (5s, 500ms)"
    )
    rp.add_argument(
        "--out",
        help="CSV, one row per input row: its timestamp as written, score (what the detector compares: smoothed), "
        "threshold, anomaly, raw_score, status (warmup|insufficient|scored)",
    )
    rp.add_argument("--plot", help="PNG of the tags, the score against its threshold and the anomaly spans")
    rp.set_defaults(func=cmd_replay)

    t = sub.add_parser("train", help="train an int8 model bundle from CSVs of normal operation (train extra)")
    t.add_argument("data", nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--name", required=True)
    t.add_argument("--inputs", help="comma-separated columns (default: every column but labels)")
    t.add_argument("--rows", type=int, default=0, help="use only the first N rows of each file")
    t.add_argument("--window", type=int, default=16)
    t.add_argument("--sample-interval", type=float, default=1.0)
    t.add_argument("--hidden", type=int, default=32)
    t.add_argument("--bottleneck", type=int, default=8)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", choices=["int8", "float32"], default="int8")
    t.add_argument("--quantile", type=float, default=0.99)
    t.add_argument("--margin", type=float, default=1.5)
    t.add_argument("--description", default="")
    t.add_argument(
        "--normalise",
        choices=["global", "per-run"],
        default="global",
        help="per-run: standardise each file on its own, as per-machine calibration will (default global)",
    )
    t.add_argument("--segment-rows", type=int, default=0, help="per-run: standardise every N rows on their own")
    t.add_argument("--smoothing", type=int, default=1, help="detector default: rolling mean over N window scores")
    t.add_argument("--exit-ratio", type=float, default=0.8, help="detector default: leave below ratio × threshold")
    t.add_argument("--min-duration", type=float, default=5.0, help="detector default: seconds an anomaly lasts")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
