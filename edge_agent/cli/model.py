"""`model inspect`, `calibrate`, `train` (`replay`: cli/replay.py): model bundles, offline or from the machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from edge_agent.cli import replay
from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, _load
from edge_agent.cli.run import _collect_live

# ---------------------------------------------------------------- model, calibrate, replay, train


def cmd_model_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's metadata, tensors and sha256."""
    from edge_agent.scoring.base import plugin_for
    from edge_agent.scoring.bundle import ModelError, load_bundle
    from edge_agent.scoring.runtime import ModelRuntime

    try:
        bundle = load_bundle(args.file)
        tensors = ModelRuntime(bundle).describe()
        kind = plugin_for(bundle.metadata.score.kind)
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
        f"  score      {m.score.kind} ({kind.summary}), smoothing {m.score.smoothing}\n"
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

    try:
        bundle = load_bundle(args.model)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    inputs = bundle.metadata.inputs
    if args.csv:
        try:
            data = replay.read_checked(args.csv, args, bundle.metadata.sample_interval, "calibrate").select(inputs)
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


def cmd_train(args: argparse.Namespace) -> int:
    """Train an int8 bundle from CSVs of normal operation (needs the train extra)."""
    from edge_agent.scoring.bundle import ModelError, save_bundle
    from edge_agent.scoring.table import check_spacing, read_table
    from edge_agent.scoring.train import TrainOptions, train

    try:
        tables = [read_table(p) for p in args.data]
        inputs = (
            args.inputs.split(",")
            if args.inputs
            else tables[0].inputs  # every column but the labels (anomaly, label, changepoint, fault_active)
        )
        series = [t.select(inputs) for t in tables]
        for warning in (w for t in tables for w in check_spacing(t, args.sample_interval, allow=True)):
            print(f"train: warning: {warning} (--sample-interval)", file=sys.stderr)  # the bundle would say so
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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the parsers of model inspect, calibrate, replay and train."""
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
    replay.add_csv_options(c)
    c.set_defaults(func=cmd_calibrate)

    replay.add_parser(sub, threshold=_threshold, exit_ratio=_exit_ratio, seconds=_seconds)

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
