"""Benchmark: the public SKAB protocol run through the agent's own replay path.

For every CSV under DATA_DIR with an `anomaly` column, the agent replays the file exactly as
`edge-agent replay FILE --model MODEL --calibrate-rows 400` does (buffers → windows → int8 model →
detector; normalisation and threshold recalibrated on the file's first 400 rows, CLI defaults
otherwise). The test part is every row from 400 on (from N on with --calibrate-rows N: never a row
the threshold was calibrated on); the outlier metrics pool one confusion matrix over the test rows
of all labelled files, the changepoint metrics are NAB scores, and both are printed beside the
published SKAB results for the same files. CSVs without labels (anomaly-free)
are normal data only: their false-alarm rate after the first 400 rows is printed on its own line,
and again with the file cut into runs as long as the labelled ones (each calibrated on its own
first 400 rows), the horizon a 400-row calibration is meant for.

    python bench/skab.py                                   # /work/shared/data/skab, models/skab/skab-pump.tflite
    python bench/skab.py DATA_DIR --model other.tflite
    python bench/skab.py --quiet                           # only the machine line (JSON after "SKAB ")
    python bench/skab.py --cv [--folds 16] [--recipe 'normalise=per-run,bottleneck=4,hidden=64' ...]
                              # cross-validation by run, in-sample beside it (TensorFlow; bench/skab_cv.py)

NAB scoring follows SKAB's own `core/metrics.py` (from the tsad library, as called by SKAB's notebooks:
`chp_score(true_cp, predicted_cp, metric="nab", window_width="60s", anomaly_window_destination="righter")`):
a detection window of 60 s starts at each labelled changepoint (a window that would overlap the next one
is cut: the next window starts where this one ends); predicted changepoints are the test rows where the
0/1 prediction changes (the first test row counts if it is 1). Per window, the first predicted changepoint
inside it (ends included) scores from A_tp at the window's start down to A_fp at its end, along SKAB's
"improved" scaled tanh (1000 steps, koef 1); a window without one scores A_fn; every predicted changepoint
outside all windows scores A_fp (further ones inside a window cost nothing). Profiles (A_tp, A_fp, A_fn):
standard (1, −0.11, −1), low-FP (1, −0.22, −1), low-FN (1, −0.11, −2). Summed over files and reported as
100·(S − S_null)/(S_perfect − S_null), S_null = windows·A_fn, S_perfect = windows·A_tp. Checked against a
transcription of SKAB's code (pandas) on this model's and on random predictions: the same to 2 decimals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edge_agent.scoring.bundle import Bundle, load_bundle
from edge_agent.scoring.replay import Table, read_table, replay

DEFAULT_DATA = "/work/shared/data/skab"
DEFAULT_MODEL = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "models", "skab", "skab-pump.tflite"))
TRAIN_ROWS = 400  # SKAB protocol: the first 400 rows of each file are its training part
NAB_WINDOW = 60.0  # seconds, to the right of each labelled changepoint
# the recipe of models/skab/skab-pump.tflite (models/README.md has its `edge-agent train` command)
SHIPPED_RECIPE = "normalise=per-run,bottleneck=4,epochs=20"
PROFILES = {"standard": (1.0, -0.11, -1.0), "low_fp": (1.0, -0.22, -1.0), "low_fn": (1.0, -0.11, -2.0)}

# Published numbers (SKAB README at commit b2c0d46, see /work/shared/data/skab/README.md): F1, FAR %, MAR %.
PUBLISHED = {
    "valve1": [
        ("Conv-AE", 0.75, 14.4, 31.84),
        ("MSET", 0.78, 38.53, 14.98),
        ("T²+Q (PCA)", 0.76, 23.89, 26.09),
    ],
    "all": [
        ("Conv-AE", 0.78, 13.55, 28.02),
        ("MSET", 0.78, 39.73, 14.13),
        ("T²+Q (PCA)", 0.76, 26.62, 24.92),
        ("LSTM-AE", 0.74, 29.96, 25.92),
        ("Isolation Forest", 0.29, 2.56, 82.89),
    ],
}
PUBLISHED_FILES = {"valve1": 16, "all": 34}

I8 = npt.NDArray[np.int8]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FileResult:
    """One labelled file's test part: timestamps, labels and the agent's 0/1 prediction."""

    name: str
    group: str
    times: F64
    anomaly: I8
    changepoint: I8
    prediction: I8


def _natural(p: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_csvs(root: Path) -> list[Path]:
    """Every CSV under root, in natural order (valve1/2.csv before valve1/10.csv)."""
    return sorted((p for p in root.rglob("*.csv") if p.is_file()), key=_natural)


def _column(columns: tuple[str, ...], name: str) -> int | None:
    lower = [c.lower() for c in columns]
    return lower.index(name) if name in lower else None


def confusion(results: list[FileResult]) -> tuple[int, int, int, int]:
    """TP, TN, FP, FN pooled over the test rows of all files."""
    tp = tn = fp = fn = 0
    for r in results:
        t, p = r.anomaly == 1, r.prediction == 1
        tp += int((t & p).sum())
        tn += int((~t & ~p).sum())
        fp += int((~t & p).sum())
        fn += int((t & ~p).sum())
    return tp, tn, fp, fn


def outlier_metrics(results: list[FileResult]) -> dict[str, float]:
    """SKAB's binary metrics: F1 = TP/(TP+(FP+FN)/2), FAR % and MAR %."""
    tp, tn, fp, fn = confusion(results)
    return {
        "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 1.0,
        "far": 100.0 * fp / (fp + tn) if fp + tn else 0.0,
        "mar": 100.0 * fn / (fn + tp) if fn + tp else 0.0,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def predicted_changepoints(prediction: I8) -> I8:
    """Rows where the 0/1 prediction changes; the first row counts when it is 1 (SKAB: |diff|, iloc[0] = pred[0])."""
    cp = np.zeros_like(prediction)
    if len(prediction):
        cp[0] = prediction[0]
        cp[1:] = np.abs(np.diff(prediction))
    return cp


def detection_windows(cp_times: F64, width: float) -> list[list[float]]:
    """[t, t + width] per labelled changepoint; an overlapping window starts where the previous one ends."""
    windows = [[float(t), float(t) + width] for t in cp_times]
    for i in range(len(windows) - 1):  # tsad intersection_mode "cut right window"
        if windows[i][1] >= windows[i + 1][0]:
            windows[i + 1][0] = windows[i][1]
    return windows


def _scaled_tanh(position: float, a_tp: float, a_fp: float, detail: int = 1000) -> float:
    """SKAB/tsad `my_scale` (clear-anomalies mode, koef 1): A_tp at the window's start down to A_fp at its end."""
    event = min(int(position * detail), detail - 1)
    x = -math.pi / 2 + math.pi * event / (detail - 1)  # np.linspace(-π/2, π/2, detail)[event]
    half = (a_tp - a_fp) / 2
    return half * -math.tanh(x) / math.tanh(math.pi / 2) + half + a_fp


def nab_file(times: F64, true_cp: I8, pred_cp: I8) -> tuple[list[float], int]:
    """Raw NAB score per profile for one file, and its number of detection windows."""
    windows = detection_windows(times[true_cp == 1], NAB_WINDOW)
    tp_times = times[pred_cp == 1]
    n_fp = 0
    first_hits: list[tuple[float, float, float]] = []
    n_fn = 0
    if not windows:
        n_fp = len(tp_times)
    else:
        n_fp += int((tp_times < windows[0][0]).sum())
        for i, (lo, hi) in enumerate(windows):
            inside = tp_times[(tp_times >= lo) & (tp_times <= hi)]
            if len(inside) == 0:
                n_fn += 1
            else:
                first_hits.append((lo, float(inside[0]), hi))
            if i + 1 < len(windows):
                n_fp += int(((tp_times > hi) & (tp_times < windows[i + 1][0])).sum())
        n_fp += int((tp_times > windows[-1][1]).sum())
    scores = []
    for a_tp, a_fp, a_fn in PROFILES.values():
        s = a_fp * n_fp + a_fn * n_fn
        for lo, t, hi in first_hits:
            s += _scaled_tanh((t - lo) / (hi - lo) if hi > lo else 0.0, a_tp, a_fp)
        scores.append(s)
    return scores, len(windows)


def nab_metrics(results: list[FileResult]) -> dict[str, float]:
    """NAB scores (standard, low-FP, low-FN) over all files: 100·(S − S_null)/(S_perfect − S_null)."""
    total = np.zeros(len(PROFILES))
    n_windows = 0
    for r in results:
        s, n = nab_file(r.times, r.changepoint, predicted_changepoints(r.prediction))
        total += s
        n_windows += n
    out = {}
    for k, (name, (a_tp, _, a_fn)) in enumerate(PROFILES.items()):
        null, perfect = n_windows * a_fn, n_windows * a_tp
        out[f"nab_{name}"] = 100.0 * (total[k] - null) / (perfect - null) if perfect != null else float("nan")
    return out


def file_result(table: Table, rel: Path, anomaly_flags: npt.NDArray[np.int8], calibrate_rows: int) -> FileResult | None:
    """A labelled file's test part (rows from `calibrate_rows` on) with the agent's flags; None without labels."""
    a_col, c_col = _column(table.columns, "anomaly"), _column(table.columns, "changepoint")
    if a_col is None:
        return None
    test = slice(calibrate_rows, None)  # the rows the threshold was not calibrated on
    anomaly = np.nan_to_num(table.values[test, a_col]).astype(np.int8)
    cp = (
        np.nan_to_num(table.values[test, c_col]).astype(np.int8)
        if c_col is not None
        else predicted_changepoints(anomaly)
    )
    group = rel.parts[0] if len(rel.parts) > 1 else "."
    return FileResult(str(rel), group, table.times[test], anomaly, cp, anomaly_flags[test].astype(np.int8))


def far_in_runs(
    bundle: Bundle, times: F64, data: F64, span: int, *, calibrate_rows: int, quantile: float, margin: float
) -> float:
    """FAR % of normal data cut into consecutive runs of `span` rows, each calibrated on its own first rows."""
    fp = rows = 0
    for start in range(0, len(times) - span + 1, span):
        part = slice(start, start + span)
        r = replay(bundle, times[part], data[part], calibrate_rows=calibrate_rows, quantile=quantile, margin=margin)
        fp += int(r.anomaly[calibrate_rows:].sum())
        rows += span - calibrate_rows
    return 100.0 * fp / rows if rows else 0.0


def run(
    data_dir: Path, model: Path, *, calibrate_rows: int = TRAIN_ROWS, quantile: float = 0.99, margin: float = 1.5
) -> tuple[list[FileResult], dict[str, dict[str, float]], str]:
    """Replay every labelled file; score normal-only files for false alarms. Returns results, normal FAR, sha256."""
    bundle = load_bundle(model)
    inputs = bundle.metadata.inputs
    labelled: list[FileResult] = []
    normal_files: list[tuple[str, F64, F64, I8]] = []
    for path in find_csvs(data_dir):
        table = read_table(path)
        try:
            data = table.select(inputs)
        except ValueError:
            continue  # not a file of this machine
        if len(table.times) <= calibrate_rows + bundle.metadata.window:
            continue
        result = replay(
            bundle, table.times, data, calibrate_rows=calibrate_rows, quantile=quantile, margin=margin, source=str(path)
        )
        rel = path.relative_to(data_dir)
        found = file_result(table, rel, result.anomaly, calibrate_rows)
        if found is None:
            normal_files.append((str(rel), table.times, data, result.anomaly[calibrate_rows:].astype(np.int8)))
        else:
            labelled.append(found)
    # normal-only files: false alarms after the first 400 rows, and (a fairer horizon for a model calibrated on
    # 400 rows) in consecutive runs as long as the labelled files, each calibrated on its own first 400 rows
    span = int(np.median([len(r.times) for r in labelled])) + calibrate_rows if labelled else 0
    normal: dict[str, dict[str, float]] = {}
    for name, times, data, pred in normal_files:
        m = {"rows": float(len(pred)), "fp": float(pred.sum()), "far": 100.0 * float(pred.mean())}
        if span and len(times) >= span:
            far = far_in_runs(
                bundle, times, data, span, calibrate_rows=calibrate_rows, quantile=quantile, margin=margin
            )
            m.update({"span": float(span), "runs": float(len(times) // span), "far_runs": far})
        normal[name] = m
    return labelled, normal, bundle.sha256


def summarise(results: list[FileResult]) -> dict[str, dict[str, float]]:
    """Metrics per group (top-level folder) and over all labelled files."""
    groups = sorted({r.group for r in results}, key=_natural)  # type: ignore[arg-type]
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        rs = [r for r in results if r.group == g]
        out[g] = {"files": len(rs), **outlier_metrics(rs), **nab_metrics(rs)}
    if len(groups) > 1:
        out["all"] = {"files": len(results), **outlier_metrics(results), **nab_metrics(results)}
    return out


def table(summary: dict[str, dict[str, float]], model_name: str) -> str:
    """The markdown table: the agent's rows beside the published rows for the same files."""
    lines = [
        "| files | detector | F1 | FAR, % | MAR, % | NAB standard | NAB low-FP | NAB low-FN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, m in summary.items():
        label = f"{g} ({int(m['files'])})"
        lines.append(
            f"| {label} | **{model_name}** (int8, replay) | **{m['f1']:.2f}** | **{m['far']:.2f}** "
            f"| **{m['mar']:.2f}** | {m['nab_standard']:.2f} | {m['nab_low_fp']:.2f} | {m['nab_low_fn']:.2f} |"
        )
        # published rows only beside the same files: all 16 of valve1, or all 34 labelled SKAB files
        same = PUBLISHED_FILES.get(g) == m["files"]
        for name, f1, far, mar in PUBLISHED[g] if same else []:
            lines.append(f"| {label} | {name} (published) | {f1:.2f} | {far:.2f} | {mar:.2f} | – | – | – |")
    return "\n".join(lines)


def main_cv(data_dir: Path, recipes: list[str], folds: int, calibrate_rows: int, quiet: bool) -> int:
    """--cv: in-sample and cross-validated figures per recipe, a table and one machine line per recipe."""
    from skab_cv import cross_validate, cv_table, parse_recipe

    if not 2 <= folds <= 16:
        print(f"--folds {folds}: between 2 and 16 (the valve1 runs)", file=sys.stderr)
        return 2
    try:
        parsed = [parse_recipe(r) for r in recipes]
    except ValueError as exc:
        print(f"--recipe: {exc}", file=sys.stderr)
        return 2
    results = []
    for recipe in parsed:
        r = cross_validate(data_dir, recipe, folds=folds, rows=calibrate_rows)
        results.append(r)
        print("SKAB-CV " + json.dumps(r, separators=(",", ":")), flush=True)
    if not quiet:
        print(
            f"\nSKAB valve1, {folds}-fold cross-validation by run (run i in fold i mod {folds}); each model trained "
            f"on the first {calibrate_rows} rows of anomaly-free.csv and of the other folds' runs; replay "
            "--calibrate-rows "
            f"{calibrate_rows}, test rows ≥ {calibrate_rows}, pooled over all 16 runs. In-sample: one model on all "
            "17 runs scoring all 16.\n"
        )
        print(cv_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", nargs="?", default=DEFAULT_DATA, help=f"SKAB-like data/ folder (default {DEFAULT_DATA})")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model bundle (default models/skab/skab-pump.tflite)")
    p.add_argument("--calibrate-rows", type=int, default=TRAIN_ROWS)
    p.add_argument("--quantile", type=float, default=0.99, help="as `replay --quantile` (CLI default 0.99)")
    p.add_argument("--margin", type=float, default=1.5, help="as `replay --margin` (CLI default 1.5)")
    p.add_argument("--quiet", action="store_true", help="print only the machine line")
    p.add_argument(
        "--cv", action="store_true", help="cross-validate training recipes by valve1 run (TensorFlow; bench/skab_cv.py)"
    )
    p.add_argument("--folds", type=int, default=4, help="--cv: folds by run, run i in fold i mod K (16: leave one out)")
    p.add_argument(
        "--recipe",
        action="append",
        help="--cv: key=value,... (TrainOptions keys, smoothing/exit_ratio/min_duration, quantile/margin); repeatable; "
        f"default the shipped recipe: {SHIPPED_RECIPE}",
    )
    args = p.parse_args(argv)
    if args.cv:
        return main_cv(
            Path(args.data_dir), args.recipe or [SHIPPED_RECIPE], args.folds, args.calibrate_rows, args.quiet
        )
    data_dir, model = Path(args.data_dir), Path(args.model)
    t0 = time.perf_counter()
    results, normal, sha = run(
        data_dir, model, calibrate_rows=args.calibrate_rows, quantile=args.quantile, margin=args.margin
    )
    if not results:
        print(f"{data_dir}: no CSV with an `anomaly` column and the model's inputs", file=sys.stderr)
        return 1
    summary = summarise(results)
    elapsed = time.perf_counter() - t0
    if not args.quiet:
        print(
            f"SKAB protocol on {data_dir}: {len(results)} labelled files, replay --calibrate-rows "
            f"{args.calibrate_rows} (q{args.quantile} × {args.margin}), test rows ≥ {args.calibrate_rows}, NAB window "
            f"{NAB_WINDOW:g} s right of each changepoint; model {model.name} sha256 {sha[:12]}\n"
        )
        print(table(summary, model.stem))
        for name, m in normal.items():
            rows = f"{int(m['fp'])} alarm rows of {int(m['rows'])} test rows"
            print(
                f"\nnormal-only {name}: FAR {m['far']:.2f} % after its first {args.calibrate_rows} rows ({rows})",
                end="",
            )
            if "far_runs" in m:
                print(
                    f"; FAR {m['far_runs']:.2f} % cut into {int(m['runs'])} runs of {int(m['span'])} rows "
                    f"(the labelled files' length), each calibrated on its own first {args.calibrate_rows}",
                    end="",
                )
            print()
        print(f"\n{elapsed:.1f} s")
    machine = {
        "model": str(model),
        "sha256": sha,
        "calibrate_rows": args.calibrate_rows,
        "groups": {g: {k: round(v, 4) for k, v in m.items()} for g, m in summary.items()},
        "normal": {k: {f: round(v[f], 4) for f in ("far", "far_runs") if f in v} for k, v in normal.items()},
        "seconds": round(elapsed, 1),
    }
    print("SKAB " + json.dumps(machine, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
