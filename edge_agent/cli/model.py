"""`model inspect`, `calibrate`, `replay` and `train`: model bundles, offline or from the live machine."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        + "".join(f"    {k:9} {_short(v)}\n" for k, v in m.score.params.items())  # the kind's own numbers
        + f"  threshold  {m.threshold.value:.6g} ({m.threshold.method}: q{m.threshold.quantile} × {m.threshold.margin}"
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


def _short(value: object, limit: int = 100) -> str:
    """A score parameter in one line: JSON, cut at `limit` characters (a long list stays readable)."""
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    if bundle.metadata.training.get("normalise") == "per-run" and not args.calibrate_rows:
        # its normalisation and threshold are the training runs', not this machine's: without a
        # calibration on this run its score says little (it used to find nothing, silently)
        print(
            f"replay: warning: {args.model} was trained to be calibrated on each run (normalise: per-run); "
            "pass --calibrate-rows N (the first N rows, known normal) or its alarms mean little",
            file=sys.stderr,
        )
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

    started = time.monotonic()
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
    if args.holdout == 0:
        print(
            "train: warning: --holdout 0: the threshold comes from the windows the model was fitted on, "
            "which it reconstructs better than new normal data: expect false alarms",
            file=sys.stderr,
        )
    try:
        series = [s[: args.rows] if args.rows else s for s in series]
        given = {f: getattr(args, f) for f in TRAIN_OPTIONS if getattr(args, f) is not None}
        options = TrainOptions(name=args.name, inputs=tuple(inputs), description=args.description, **given)
        bundle = train(series, options, source=", ".join(Path(p).name for p in args.data))
    except (ModelError, ValueError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        save_bundle(bundle, args.out)
    except OSError as exc:
        print(f"train: {args.out}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    meta = bundle.metadata
    t = meta.threshold
    held = (
        f"{meta.training['holdout_windows']} held-out windows ({meta.training['holdout_rows']} rows, "
        f"the last {options.holdout:g} of each run)"
        if options.holdout > 0
        else f"{meta.training['windows']} training windows (no hold-out)"
    )
    print(
        f"{args.out}: {options.kind}, {options.dtype} {meta.training['architecture']}, sha256 {bundle.sha256}\n"
        f"threshold {t.value:.6g} = q{t.quantile:g} × {t.margin:g} of {held}\n"
        f"trained on {meta.training['windows']} windows of {meta.training['rows']} rows in "
        f"{time.monotonic() - started:.1f} s"
    )
    return EXIT_OK


class _TrainHelp(argparse.HelpFormatter):
    """Fills an option's `{default}` from TrainOptions when help is printed: the recipe is imported only then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "{default}" not in text:
            return text
        from edge_agent.scoring.train import TrainOptions

        value = next(f.default for f in dataclasses.fields(TrainOptions) if f.name == action.dest)
        return text.replace("{default}", f"{value:g}" if isinstance(value, float) else str(value))


class _TrainableKinds:
    """`--kind`'s choices: the registry's kinds with a training hook, looked up when a kind is checked or listed."""

    def _keys(self) -> list[str]:
        from edge_agent.scoring.base import SCORERS

        return sorted(k for k, p in SCORERS.items() if p.fit is not None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())


def _fraction(text: str) -> float:
    """A hold-out fraction argument: 0 ≤ f < 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a hold-out fraction is at least 0 and below 1")
    return value


# the TrainOptions fields `train` sets, as (flag, add_argument keywords): no default here, TrainOptions holds
# them (the one place); `{default}` in a help text is filled from it when help is printed (_TrainHelp)
TRAIN_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--kind",
        {
            "choices": _TrainableKinds(),
            # a metavar, or argparse lists the choices (imports the registry) while building the parser
            "metavar": "KIND",
            "help": "the model kind: %(choices)s (score.kind; see models/README.md, 'which kind when'; "
            "default {default})",
        },
    ),
    ("--window", {"type": int, "help": "samples per window (default {default})"}),
    (
        "--sample-interval",
        {
            "type": float,
            "metavar": "SECONDS",
            "help": "seconds between the CSV's rows, the model's grid (default {default})",
        },
    ),
    ("--hidden", {"type": int, "help": "units (dense) or filters (conv) of the outer layers (default {default})"}),
    (
        "--bottleneck",
        {"type": int, "help": "units (dense) or filters (conv) of the innermost layer (default {default})"},
    ),
    ("--epochs", {"type": int, "help": "passes over the training windows (default {default})"}),
    ("--seed", {"type": int, "help": "random seed: the same seed gives the same file (default {default})"}),
    ("--dtype", {"choices": ["int8", "float32"], "help": "the TFLite model's arithmetic (default {default})"}),
    (
        "--quantile",
        {"type": float, "help": "threshold = this quantile of the held-out scores × margin (default {default})"},
    ),
    ("--margin", {"type": float, "help": "threshold factor (default {default})"}),
    (
        "--holdout",
        {
            "type": _fraction,
            "metavar": "FRACTION",
            "help": "the last FRACTION of each run's rows is held out of fitting; the threshold comes from "
            "their windows only (default {default}; 0: threshold from the training windows, too low)",
        },
    ),
    (
        "--normalise",
        {
            "choices": ["global", "per-run"],
            "help": "per-run: standardise each file on its own, as per-machine calibration will (default {default})",
        },
    ),
    (
        "--segment-rows",
        {"type": int, "help": "per-run: standardise every N rows on their own (default {default}: whole files)"},
    ),
    ("--smoothing", {"type": int, "help": "detector default: rolling mean over N window scores (default {default})"}),
    (
        "--exit-ratio",
        {"type": float, "help": "detector default: an anomaly ends below ratio × threshold (default {default})"},
    ),
    (
        "--min-duration",
        {
            "type": float,
            "metavar": "SECONDS",
            "help": "detector default: seconds an anomaly lasts at least (default {default})",
        },
    ),
)
TRAIN_OPTIONS = tuple(flag[2:].replace("-", "_") for flag, _ in TRAIN_FLAGS)


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

    t = sub.add_parser(
        "train",
        help="train an int8 model bundle from CSVs of normal operation (train extra)",
        formatter_class=_TrainHelp,
        description="Fit a model of the chosen kind on the first rows of each run, set its threshold on the "
        "held-out last rows, and write an int8 .tflite bundle. Only the result is printed on stdout; "
        "TensorFlow's own messages go to stderr.",
    )
    t.add_argument("data", nargs="+", help="CSVs of normal operation: a time column and the input columns")
    t.add_argument("--out", required=True, help="the bundle to write (.tflite)")
    t.add_argument("--name", required=True, help="the model's name in its metadata and events")
    t.add_argument("--inputs", help="comma-separated columns (default: every column but labels)")
    t.add_argument("--rows", type=int, default=0, help="use only the first N rows of each file (default 0: all)")
    t.add_argument("--description", default="", help="one line for the bundle's metadata (default empty)")
    for flag, keywords in TRAIN_FLAGS:
        t.add_argument(flag, **keywords)
    t.set_defaults(func=cmd_train)
