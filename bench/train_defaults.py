"""Benchmark: `edge-agent train` with its default options on a process it has not seen (needs TensorFlow).

The process is the project's simulator sampled slowly (default one row a minute, like a plant
historian), with persistent faults. Everything goes through the commands a user runs, in process:

1. `edge-agent simulate --record` normal operation for training (seed 1), normal operation for the
   false-alarm check (seed 2), and one run per fault (seeds 3, 4, …): the fault starts after a third
   of the run and lasts to its end;
2. `edge-agent train NORMAL.csv --sample-interval S --name sim --out M` (plus `--train-args`);
3. `edge-agent replay` of every test run with the bundle as trained (no recalibration).

Per fault it prints the share of faulty rows (`fault_active` = 1) flagged, beside the false-alarm
rate on the held-out normal run; and, to tell the model from its threshold rule, the share flagged
at the threshold that gives exactly 1 % false alarms on the held-out normal run ("at 1 % FAR").

    python bench/train_defaults.py                          # 1000 training rows at 60 s
    python bench/train_defaults.py --train-args "--smoothing 5"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.cli import main as cli
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.replay import read_table, replay
from edge_agent.simulate import list_faults

# a stuck transmitter holds a plausible value and a spike lasts under a second: at a sample a
# minute neither leaves a trace a window model can see (listed, not averaged)
UNDETECTABLE = ("sensor_stuck", "sensor_spike")


def _quiet(argv: list[str]) -> int:
    """Run an edge-agent command with its chatter captured (printed if it fails)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    if code:
        print(f"edge-agent {' '.join(argv)}: exit {code}\n{out.getvalue()}{err.getvalue()}", file=sys.stderr)
    return code


def record(path: Path, rows: int, interval: float, seed: int, fault: str = "") -> None:
    """`edge-agent simulate --record`: rows × interval seconds; a fault from a third of the run to its end."""
    argv = ["simulate", "--record", str(path), "--duration", str(rows * interval), "--seed", str(seed)]
    argv += ["--record-every", str(interval)]
    if fault:
        argv += ["--fault", f"{fault}@{rows // 3 * interval}+{rows * interval}"]
    if _quiet(argv):
        raise SystemExit(1)


def flags_and_scores(model: Path, csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`edge-agent replay CSV --model M` as a function: anomaly flags, smoothed scores, fault_active labels."""
    bundle = load_bundle(model)
    table = read_table(csv)
    result = replay(bundle, table.times, table.select(bundle.metadata.inputs), source=str(csv))
    labels = table.select(["fault_active"])[:, 0]
    return result.anomaly.astype(bool), result.score, np.nan_to_num(labels).astype(bool)


def skab_runs(data_dir: Path, work: Path, train_args: list[str], rows: int) -> dict[str, dict[str, float]]:
    """SKAB as the unseen process: per valve1 run, `train RUN --rows 400` and replay the run's later rows."""
    out = {}
    paths = sorted((data_dir / "valve1").glob("*.csv"), key=lambda q: int(q.stem) if q.stem.isdigit() else -1)
    for path in paths:
        model = work / f"skab-{path.stem}.tflite"
        argv = ["train", str(path), "--rows", str(rows), "--out", str(model), "--name", "skab-run", *train_args]
        if _quiet(argv):
            raise SystemExit(1)
        bundle = load_bundle(model)
        table = read_table(path)
        result = replay(bundle, table.times, table.select(bundle.metadata.inputs), source=str(path))
        test = slice(rows, None)
        y = np.nan_to_num(table.select(["anomaly"])[test, 0]).astype(bool)
        flags, scores = result.anomaly[test].astype(bool), result.score[test]
        at_1 = float(np.quantile(scores[~y], 0.99))
        out[f"valve1/{path.stem}"] = {
            "far": 100.0 * float(flags[~y].mean()),
            "flagged": float(flags[y].mean()),
            "flagged_at_1pct": float((scores[y] > at_1).mean()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=60.0, help="seconds per row (default 60)")
    p.add_argument("--train-rows", type=int, default=1000, help="normal rows to train on (default 1000)")
    p.add_argument("--test-rows", type=int, default=600, help="rows per test run (default 600)")
    p.add_argument("--train-args", default="", help="extra `edge-agent train` options, e.g. '--smoothing 5'")
    p.add_argument("--work", help="keep the CSVs and the model here (default a temporary folder)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--skab",
        metavar="DATA_DIR",
        help="instead: SKAB valve1 as the process, one model per run on its first 400 rows (protocol rows)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.skab:
        with tempfile.TemporaryDirectory() as tmp:
            runs = skab_runs(Path(args.skab), Path(args.work or tmp), shlex.split(args.train_args), 400)
        mean = {k: float(np.mean([v[k] for v in runs.values()])) for k in ("far", "flagged", "flagged_at_1pct")}
        if not args.quiet:
            print("| run | FAR, % (normal test rows) | flagged | flagged at 1 % FAR |\n|---|---|---|---|")
            for name, v in [*runs.items(), ("**mean**", mean)]:
                print(f"| {name} | {v['far']:.2f} | {v['flagged']:.3f} | {v['flagged_at_1pct']:.3f} |")
        summary = {"process": "skab", "train_args": args.train_args, "mean": {k: round(v, 4) for k, v in mean.items()}}
        print("TRAIN-DEFAULTS " + json.dumps({**summary, "seconds": round(time.perf_counter() - t0, 1)}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        record(work / "train.csv", args.train_rows, args.interval, 1)
        record(work / "normal.csv", args.test_rows, args.interval, 2)
        faults = [name for name, _ in list_faults()]
        for k, name in enumerate(faults):
            record(work / f"{name}.csv", args.test_rows, args.interval, 3 + k, name)
        model = work / "model.tflite"
        train = ["train", str(work / "train.csv"), "--out", str(model), "--name", "sim"]
        if _quiet([*train, "--sample-interval", str(args.interval), *shlex.split(args.train_args)]):
            return 1
        flags, scores, _ = flags_and_scores(model, work / "normal.csv")
        warm = np.isfinite(scores)
        far = 100.0 * float(flags[warm].mean())
        at_1 = float(np.quantile(scores[warm], 0.99))  # the threshold with 1 % false alarms on held-out normal rows
        rows = {}
        for name in faults:
            f, s, y = flags_and_scores(model, work / f"{name}.csv")
            rows[name] = {"flagged": float(f[y].mean()), "flagged_at_1pct": float((s[y] > at_1).mean())}
    detectable = [v for k, v in rows.items() if k not in UNDETECTABLE]
    mean = {k: float(np.mean([v[k] for v in detectable])) for k in ("flagged", "flagged_at_1pct")}
    if not args.quiet:
        print(
            f"edge-agent train defaults{' + ' + args.train_args if args.train_args else ''}, --sample-interval "
            f"{args.interval:g}; {args.train_rows} normal training rows; held-out normal run of {args.test_rows} "
            f"rows: FAR {far:.2f} %\n"
        )
        print("| fault | flagged (bundle threshold) | flagged at 1 % FAR |\n|---|---|---|")
        for name, v in rows.items():
            mark = " (not averaged)" if name in UNDETECTABLE else ""
            print(f"| {name}{mark} | {v['flagged']:.3f} | {v['flagged_at_1pct']:.3f} |")
        print(f"| **mean of detectable** | **{mean['flagged']:.3f}** | **{mean['flagged_at_1pct']:.3f}** |")
    machine = {
        "train_args": args.train_args,
        "interval": args.interval,
        "train_rows": args.train_rows,
        "far": round(far, 3),
        "mean": {k: round(v, 4) for k, v in mean.items()},
        "faults": {k: {f: round(x, 4) for f, x in v.items()} for k, v in rows.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("TRAIN-DEFAULTS " + json.dumps(machine, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
