"""Benchmark: calibration variants on runs the model never saw, and drift adaptation on the long normal run.

Held-out runs: the SKAB recipe (models/README.md, skab) trained four times, each time without a
quarter of the valve1 runs (fold k leaves out runs i with i % 4 == k; anomaly-free's first 400 rows
are always in). Every valve1 run is then replayed through the agent's own path with the model that
did not see it, calibrated on its own first 400 rows (`replay --calibrate-rows 400` plus the
variant's options), and scored on rows ≥ 400 with bench/skab.py's metrics (F1, FAR, MAR pooled over
the 16 runs; NAB standard). The row "default" is today's calibration: the reference of every other row.
The shipped model (trained on all 16 runs' first 400 rows) is printed too, as the in-sample figure.

Drift: anomaly-free.csv calibrated on its first 400 rows, the false-alarm rate over the other 9,005
rows (2.5 h) with and without `--adapt`, and valve1's MAR with and without it (adaptation must not
learn the faults). Make the fold models first (TensorFlow, about a minute each):

    D=/work/shared/data/skab; for k in 0 1 2 3; do f="$D/anomaly-free/anomaly-free.csv";
      for i in $(seq 0 15); do [ $((i % 4)) -ne $k ] && f="$f $D/valve1/$i.csv"; done
      SOURCE_DATE_EPOCH=1767225600 edge-agent train $f --rows 400 --normalise per-run --bottleneck 4 \\
        --epochs 20 --seed 0 --name skab-fold$k --out FOLDS/fold$k.tflite; done
    python bench/calib.py --folds FOLDS [--robust-folds RFOLDS] [--k 4]

RFOLDS: the same four commands with `--scaling robust` (rows for a robust model). --k 2 with folds made
by `i % 2` (train on the even runs, score the odd ones, and back) is the split models/skab/NOTES.md used.
No speed figure here: adaptation scores a replay one window at a time (the live agent does anyway);
`seconds` is the whole run's wall time, for orientation only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from skab import DEFAULT_DATA, DEFAULT_MODEL, FileResult, nab_metrics, outlier_metrics

from edge_agent.config import ModelAdaptation
from edge_agent.scoring.bundle import Bundle, load_bundle
from edge_agent.scoring.replay import read_table, replay

ROWS = 400
FOLDS = 4
VARIANTS: dict[str, dict[str, Any]] = {
    "default (normalisation + threshold, standard)": {},
    "--threshold-only": {"calibrate_what": "threshold"},
    "--scaling robust": {"scaling": "robust"},
    "--threshold-floor 1": {"threshold_floor": 1.0},
    "--threshold-floor 0.5": {"threshold_floor": 0.5},
    "--scaling robust --threshold-floor 1": {"scaling": "robust", "threshold_floor": 1.0},
    "--margin 2": {"margin": 2.0},
    "--adapt": {"adapt": ModelAdaptation()},
}
ROBUST: dict[str, dict[str, Any]] = {
    "trained --scaling robust, calibrated robust (its default)": {},
    "trained --scaling robust, --threshold-floor 1": {"threshold_floor": 1.0},
}
ADAPT = {
    "no adaptation": None,
    "--adapt (rate 0.05, below 0.5, max_shift 10: the defaults)": ModelAdaptation(),
    "--adapt --adapt-rate 0.01": ModelAdaptation(rate=0.01),
    "--adapt --adapt-rate 0.02": ModelAdaptation(rate=0.02),
    "--adapt --adapt-rate 0.2": ModelAdaptation(rate=0.2),
    "--adapt --adapt-below 0.3": ModelAdaptation(below=0.3),
    "--adapt --adapt-below 0.7": ModelAdaptation(below=0.7),
    "--adapt --adapt-max-shift 3": ModelAdaptation(max_shift=3),
}


def _valve(data_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.stem), p) for p in (data_dir / "valve1").glob("*.csv"))


def score_runs(
    runs: list[tuple[int, Path]], model_of: dict[int, Bundle], options: dict[str, Any], k: int = FOLDS
) -> dict[str, Any]:
    """Pooled metrics over the runs, each replayed with the model that did not see it; FAR per fold too."""
    results = []
    for i, path in runs:
        table = read_table(path)
        bundle = model_of[i]
        result = replay(bundle, table.times, table.select(bundle.metadata.inputs), calibrate_rows=ROWS, **options)
        cols = [c.lower() for c in table.columns]
        test = slice(ROWS, None)
        anomaly = np.nan_to_num(table.values[test, cols.index("anomaly")]).astype(np.int8)
        cp = np.nan_to_num(table.values[test, cols.index("changepoint")]).astype(np.int8)
        pred = result.anomaly[test].astype(np.int8)
        results.append(FileResult(path.name, "valve1", table.times[test], anomaly, cp, pred))
    per_fold = [
        outlier_metrics([r for (i, _), r in zip(runs, results, strict=True) if i % k == f])["far"] for f in range(k)
    ]
    return {**outlier_metrics(results), **nab_metrics(results), "far_per_fold": per_fold}


def normal_far(path: Path, bundle: Bundle, adapt: ModelAdaptation | None) -> tuple[float, str]:
    """False-alarm rate after the first ROWS rows of a normal-only file, and the adaptation's end state."""
    table = read_table(path)
    r = replay(bundle, table.times, table.select(bundle.metadata.inputs), calibrate_rows=ROWS, adapt=adapt)
    a = r.adaptation
    state = "–" if a is None else f"{a['windows']} windows, shift {a['shift']:.3g} ({a['tag']}), stopped {a['stopped']}"
    return 100.0 * float(r.anomaly[ROWS:].mean()), state


def _row(name: str, m: dict[str, Any]) -> str:
    folds = " / ".join(f"{x:.1f}" for x in m["far_per_fold"])
    return f"| {name} | {m['f1']:.3f} | {m['far']:.2f} | {folds} | {m['mar']:.2f} | {m['nab_standard']:.2f} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", nargs="?", default=DEFAULT_DATA)
    p.add_argument("--folds", required=True, help="folder with fold0.tflite … fold3.tflite (see the docstring)")
    p.add_argument("--k", type=int, default=FOLDS, help="folds: fold k left out the runs i with i %% K == k")
    p.add_argument("--robust-folds", help="the same folds trained with --scaling robust (rows for robust models)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the shipped model (in-sample reference)")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    t0 = time.perf_counter()
    runs = _valve(data_dir)
    k = args.k
    folds = {f: load_bundle(Path(args.folds) / f"fold{f}.tflite") for f in range(k)}
    held_out = {i: folds[i % k] for i, _ in runs}
    shipped = load_bundle(args.model)
    in_sample = {i: shipped for i, _ in runs}
    machine: dict[str, Any] = {"held_out": {}, "shipped": {}, "anomaly_free": {}, "valve1_adapt": {}}
    head = "| variant | F1 | FAR, % | FAR per fold, % | MAR, % | NAB standard |\n|---|---|---|---|---|---|"
    print(f"valve1, 16 runs, each scored by the fold model (K={k}) that did not see it (rows ≥ {ROWS}):\n{head}")
    for name, options in VARIANTS.items():
        m = score_runs(runs, held_out, options, k)
        machine["held_out"][name] = m
        print(_row(name, m), flush=True)
    if args.robust_folds:
        robust = {f: load_bundle(Path(args.robust_folds) / f"fold{f}.tflite") for f in range(k)}
        for name, options in ROBUST.items():
            m = score_runs(runs, {i: robust[i % k] for i, _ in runs}, options, k)
            machine["held_out"][name] = m
            print(_row(name, m), flush=True)
    print(f"\nvalve1, the shipped model (in-sample: it saw every run's first {ROWS} rows):\n{head}")
    for name, options in VARIANTS.items():
        m = score_runs(runs, in_sample, options, k)
        machine["shipped"][name] = m
        print(_row(name, m), flush=True)
    print(f"\ndrift: anomaly-free.csv calibrated on its first {ROWS} rows, FAR over the rest; valve1 held out:")
    print("| adaptation | anomaly-free FAR, % | adaptation at the end | valve1 F1 | FAR, % | MAR, % |")
    print("|---|---|---|---|---|---|")
    free = data_dir / "anomaly-free" / "anomaly-free.csv"
    for name, spec in ADAPT.items():
        far, state = normal_far(free, shipped, spec)
        m = score_runs(runs, held_out, {"adapt": spec}, k)
        machine["anomaly_free"][name] = far
        machine["valve1_adapt"][name] = m
        print(f"| {name} | {far:.2f} | {state} | {m['f1']:.3f} | {m['far']:.2f} | {m['mar']:.2f} |", flush=True)
    machine["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{machine['seconds']} s")
    print("CALIB " + json.dumps(machine, separators=(",", ":"), default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
