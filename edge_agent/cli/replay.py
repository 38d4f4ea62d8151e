"""`replay`: score one CSV or many through the agent's scoring path, offline; and the CSV options calibrate shares.

Exit codes: 0 every file scored; 2 something was refused (the model, a CSV, its sample spacing, an output that
cannot be written, --plot without matplotlib), the other files are still scored; 1 the plot failed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.cli.common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK

if TYPE_CHECKING:
    from edge_agent.config import ModelAdaptation
    from edge_agent.scoring.bundle import Bundle
    from edge_agent.scoring.detector import WindowScorer
    from edge_agent.scoring.replay import ReplayResult
    from edge_agent.scoring.table import Table

EXIT_CODES = (
    "exit codes: 0 every file scored; 2 refused: the model, a CSV (no time column, a row index or spacing far from "
    "the bundle's sample_interval, missing columns), an output that cannot be written, or --plot without "
    "matplotlib (the other files are still scored); 1 the plot failed"
)


def add_csv_options(p: argparse.ArgumentParser) -> None:
    """The options that say how to read a CSV's time: replay and calibrate share them."""
    p.add_argument("--time-column", metavar="NAME", help="the time column (default: datetime/timestamp/time/ts/date)")
    p.add_argument(
        "--row-interval",
        type=float,
        metavar="SECONDS",
        help="rows are evenly spaced this many seconds apart: for a CSV without times, or with a row index",
    )
    p.add_argument(
        "--allow-spacing",
        action="store_true",
        help="score even when the rows' median spacing is under 0.5× or over 2× the bundle's sample_interval",
    )


def read_checked(path: str, args: argparse.Namespace, sample_interval: float, command: str) -> Table:
    """A CSV read with the time options in `args` and checked against the bundle's interval; warnings to stderr."""
    from edge_agent.scoring.table import check_spacing, read_table

    table = read_table(path, time_column=args.time_column, row_interval=args.row_interval)
    for warning in check_spacing(table, sample_interval, allow=args.allow_spacing):
        print(f"{command}: warning: {warning}", file=sys.stderr)
    return table


def out_paths(inputs: Sequence[str], out_dir: Path) -> list[Path]:
    """One output per input in `out_dir`, named after it (STEM.replay.csv; PARENT-STEM.replay.csv where stems clash)."""
    if len(set(map(str, inputs))) != len(inputs):
        raise ValueError("the same CSV is named twice")
    stems = [Path(p).stem for p in inputs]
    names = [
        f"{Path(p).resolve().parent.name}-{s}" if stems.count(s) > 1 else s for p, s in zip(inputs, stems, strict=True)
    ]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"two inputs would write {out_dir / (clash[0] + '.replay.csv')}: rename one")
    outs = [out_dir / f"{n}.replay.csv" for n in names]
    given = {Path(p).resolve() for p in inputs}
    if any(o.resolve() in given for o in outs):
        raise ValueError(f"an output in {out_dir} would overwrite an input")
    return outs


def summary(path: str, result: ReplayResult, table: Table, out: Path | str | None) -> tuple[str, int, int]:
    """The line printed for one file, its number of anomalies and of rows flagged."""
    flags = result.anomaly
    flagged = int(flags.sum())
    spans = int(((flags[1:] == 1) & (flags[:-1] == 0)).sum() + flags[:1].sum())
    text = f"{path}: {len(result.times)} rows, threshold {result.threshold:.6g}, "
    text += f"{spans} anomalies covering {flagged} rows"
    truth = table.truth()
    if truth is not None:
        name, marked = truth
        text += f"; {name} marks {int(marked.sum())} rows, {int((marked & flags).sum())} of them flagged"
    return text + (f" → {out}" if out else ""), spans, flagged


def cmd_replay(args: argparse.Namespace) -> int:
    """Run CSVs through windows, scoring and the detector; write scores and anomaly flags, one output per input."""
    inputs: list[str] = args.data
    if len(inputs) > 1 and (args.out or args.plot):
        option = "--out" if args.out else "--plot"
        print(f"replay: {option} names one file, for one CSV; with {len(inputs)} use --out-dir DIR", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # before scoring: a long replay must not end in an error about a missing library
        print("replay: --plot needs matplotlib, not installed: pip install 'edge-agent[plot]'", file=sys.stderr)
        return EXIT_CONFIG
    outs: list[Path | str | None] = [args.out] if args.out else [None] * len(inputs)
    if args.out_dir:
        try:
            outs = list(out_paths(inputs, Path(args.out_dir)))
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        except ValueError as exc:
            print(f"replay: --out-dir: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except OSError as exc:
            print(f"replay: {args.out_dir}: cannot create it: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG

    from edge_agent.scoring.bundle import ModelError, load_bundle
    from edge_agent.scoring.detector import WindowScorer

    try:
        bundle = load_bundle(args.model)
    except ModelError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # one interpreter for every file, built once the first CSV is read (a bad CSV is named before the runtime talks)
    scorer = functools.cache(lambda: WindowScorer(bundle))
    if bundle.metadata.training.get("normalise") == "per-run" and not args.calibrate_rows:
        # its normalisation and threshold are the training runs', not this machine's: without a
        # calibration on this run its score says little (it used to find nothing, silently)
        print(
            f"replay: warning: {args.model} was trained to be calibrated on each run (normalise: per-run); "
            "pass --calibrate-rows N (the first N rows, known normal) or its alarms mean little",
            file=sys.stderr,
        )
    refused = rows = spans = flagged = 0
    for path, out in zip(inputs, outs, strict=True):
        try:
            code = _replay_one(args, path, out, bundle, scorer)
        except ModelError as exc:  # the runtime refuses the model: no file can be scored
            print(f"replay: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(code, int):
            if code == EXIT_FAIL:
                return code
            refused += 1
            continue
        rows, spans, flagged = rows + code[0], spans + code[1], flagged + code[2]
    if len(inputs) > 1:
        print(
            f"{len(inputs)} files: {len(inputs) - refused} scored, {refused} refused; {rows} rows, {spans} anomalies "
            f"covering {flagged} rows" + (f" → {args.out_dir}" if args.out_dir else "")
        )
    return EXIT_CONFIG if refused else EXIT_OK


def adaptation(args: argparse.Namespace) -> ModelAdaptation | None:
    """models[].adapt from replay's --adapt options (None without --adapt)."""
    if not args.adapt:
        return None
    from edge_agent.config import ModelAdaptation  # only with --adapt: the config imports the driver registry

    given = {k: getattr(args, f"adapt_{k}") for k in ("rate", "below", "max_shift")}
    return ModelAdaptation(**{k: v for k, v in given.items() if v is not None})


def calibration_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """The calibrate section's options: --threshold-only, --scaling, --threshold-floor (calibrate and replay)."""
    p.add_argument(
        "--threshold-only",
        action="store_true",
        help=f"keep the bundle's normalisation and set only the threshold from {what}",
    )
    p.add_argument(
        "--scaling",
        choices=["standard", "robust"],
        help="standard: mean and standard deviation; robust: median and IQR (a sensor's spikes cannot set its "
        "scale); default: the bundle's own",
    )
    p.add_argument(
        "--threshold-floor",
        type=_nonnegative,
        default=0.0,
        metavar="R",
        help="raise the threshold to at least R × the bundle's own threshold (default 0: no floor)",
    )


def _nonnegative(text: str) -> float:
    """A number ≥ 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a number ≥ 0")
    return value


def _in_range(low: float, high: float) -> Callable[[str], float]:
    """A number in (low, high], as the config's models[].adapt fields."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: a number above {low:g} and at most {high:g}")
        return value

    return parse


def _replay_one(
    args: argparse.Namespace,
    path: str,
    out: Path | str | None,
    bundle: Bundle,
    shared: Callable[[], WindowScorer],
) -> int | tuple[int, int, int]:
    """Score one CSV and write its output; (rows, anomalies, rows flagged), or an exit code after saying why."""
    from edge_agent.scoring.bundle import ModelError
    from edge_agent.scoring.replay import check_rows, replay, write_result

    meta = bundle.metadata
    try:
        table = read_checked(path, args, meta.sample_interval, "replay")
        data = table.select(meta.inputs)
    except ValueError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        check_rows(table.times, args.calibrate_rows)
        scorer = shared()  # a ModelError here is the model's, not this file's: the caller stops
    except ValueError as exc:
        print(f"replay: {path}: {exc}", file=sys.stderr)
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
            source=str(path),
            scorer=scorer,
            contributions=bool(args.plot),
            calibrate_what="threshold" if args.threshold_only else "all",
            scaling=args.scaling,
            threshold_floor=args.threshold_floor,
            adapt=adaptation(args),
        )
    except (ModelError, ValueError) as exc:  # the runtime finds some model problems only when it loads it
        print(f"replay: {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if out:
            write_result(result, out, table.time_column, table.stamps)
    except OSError as exc:
        print(f"replay: {out}: cannot write it: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.plot:
        from edge_agent.scoring.plot import plot_replay

        try:
            plot_replay(result, table, data, args.plot, calibrate_rows=args.calibrate_rows)
        except (ValueError, OSError) as exc:
            print(f"replay: --plot: {exc}", file=sys.stderr)
            return EXIT_FAIL
    text, n_spans, n_flagged = summary(path, result, table, out)
    print(text)
    if result.adaptation is not None:
        a = result.adaptation
        print(
            f"{path}: adaptation: {a['windows']} windows adapted, largest shift {a['shift']:.3g} scales ({a['tag']})"
            + (f", stopped at max_shift {a['max_shift']:g}" if a["stopped"] else "")
        )
    return len(result.times), n_spans, n_flagged


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    threshold: Callable[[str], Any],
    exit_ratio: Callable[[str], Any],
    seconds: Callable[[str], Any],
) -> None:
    """Add the replay parser (the argument types are model.py's, shared with the other model commands)."""
    rp = sub.add_parser(
        "replay",
        help="score CSVs offline through the agent's own scoring path",
        description="Score CSVs offline through the agent's scoring path: one output per input. " + EXIT_CODES + ".",
    )
    rp.add_argument("data", nargs="+", help="CSVs (a time column and the model's input columns)")
    rp.add_argument("--model", required=True)
    rp.add_argument(
        "--calibrate-rows",
        type=int,
        default=0,
        metavar="N",
        help="calibrate normalisation and threshold on the first N rows of each file first",
    )
    rp.add_argument("--quantile", type=float, default=0.99)
    rp.add_argument("--margin", type=float, default=1.5)
    calibration_options(rp, what="the first N rows (with --calibrate-rows)")
    rp.add_argument(
        "--adapt", action="store_true", help="drift adaptation of the normalisation's centre, as models[].adapt"
    )
    rp.add_argument("--adapt-rate", type=_in_range(0, 0.5), metavar="R", help="as models[].adapt.rate (0.05)")
    rp.add_argument("--adapt-below", type=_in_range(0, 0.999999), metavar="B", help="as models[].adapt.below (0.5)")
    rp.add_argument(
        "--adapt-max-shift", type=_in_range(0, 1000), metavar="S", help="as models[].adapt.max_shift (10 scales)"
    )
    # the overrides a config's models[] entry can make, so a replay matches a configured model
    rp.add_argument(
        "--threshold", type=threshold, metavar="X|auto", help="as models[].threshold (default auto: the bundle's)"
    )
    rp.add_argument(
        "--exit-ratio", type=exit_ratio, metavar="R", help="as models[].hysteresis.exit_ratio (default: the bundle's)"
    )
    rp.add_argument(
        "--min-duration", type=seconds, metavar="SECONDS", help="as models[].hysteresis.min_duration (5s, 500ms)"
    )
    add_csv_options(rp)
    where = rp.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        help="one CSV: a row per input row: its timestamp as written, score (what the detector compares: smoothed), "
        "threshold, anomaly, raw_score, status (warmup|insufficient|scored)",
    )
    where.add_argument("--out-dir", metavar="DIR", help="many CSVs: DIR/STEM.replay.csv for each input, as --out")
    rp.add_argument(
        "--plot",
        metavar="FILE.png",
        help="one CSV: a panel per tag in its units, the score against the threshold, anomalies, ground truth "
        "(an anomaly/label column), calibration rows and the tags behind each alarm (needs matplotlib)",
    )
    rp.set_defaults(func=cmd_replay)
