"""Cross-validation of a SKAB training recipe by runs (`python bench/skab.py --cv`; needs TensorFlow).

The valve1 runs are split into K folds by run (run i is in fold i mod K; K = 16 is leave-one-run-out).
Each fold's model is trained with `edge_agent.scoring.train.train` on the first 400 rows of
anomaly-free.csv and of every valve1 run outside the fold, nothing else, and scores the fold's runs
through the agent's replay path exactly as `bench/skab.py` does (`replay(..., calibrate_rows=400)`,
test rows ≥ 400). The held-out runs' results are pooled over all folds into one confusion matrix and
one NAB score, and printed next to the in-sample figures of the same recipe (one model trained on
all 17 runs' first 400 rows, scoring all 16 runs, as the shipped bundle is made).

A recipe is `key=value,...`: keys of `TrainOptions` (window, hidden, bottleneck, epochs, seed,
normalise, segment_rows, kind, learning_rate, batch_size) pick the model; smoothing, exit_ratio and
min_duration are the bundle's detector defaults (set after training, as `train --smoothing` would:
replay recalibrates the threshold anyway); quantile and margin are the replay's threshold rule, and floor
holds each calibrated threshold at ≥ floor × the bundle's trained one (what `threshold_floor` trains into a
bundle, here without retraining). Trained
models are cached under $TMPDIR/edge-agent-skab-cv, keyed by the training keys and the training files'
contents and the scoring package's source, so detector variants of one model train nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent import scoring
from edge_agent.scoring.bundle import Bundle, bundle_from_bytes, embed_metadata, load_bundle
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.replay import ReplayResult, Table, read_table, replay

F64 = npt.NDArray[np.float64]
INPUTS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
DETECTOR_KEYS = ("smoothing", "exit_ratio", "min_duration")
REPLAY_KEYS = ("quantile", "margin", "floor")
CACHE = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "edge-agent-skab-cv"


@dataclass(frozen=True)
class Recipe:
    """Training keys (TrainOptions fields), detector defaults written into the bundle, and the replay's rule."""

    text: str
    train: dict[str, Any] = field(default_factory=dict)
    detector: dict[str, Any] = field(default_factory=dict)
    quantile: float = 0.99
    margin: float = 1.5
    floor: float = 0.0  # exploration: threshold at least floor × the trained (all runs') threshold


def parse_recipe(text: str) -> Recipe:
    """`key=value,...` → Recipe; an unknown key or a value of the wrong type is a ValueError naming it."""
    from edge_agent.scoring.train import TrainOptions

    types = {f.name: f.type for f in fields(TrainOptions)}
    train: dict[str, Any] = {}
    detector: dict[str, Any] = {}
    replay_rule = {"quantile": 0.99, "margin": 1.5, "floor": 0.0}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"recipe {text!r}: {item!r} is not key=value")
        if key in REPLAY_KEYS:
            replay_rule[key] = float(value)
        elif key in DETECTOR_KEYS:
            detector[key] = int(value) if key == "smoothing" else float(value)
        elif key in types and key not in ("name", "inputs", "description", "quantile", "margin", *DETECTOR_KEYS):
            kind = str(types[key])
            train[key] = int(value) if kind == "int" else float(value) if kind == "float" else value
        else:
            raise ValueError(f"recipe {text!r}: unknown key {key!r}")
    return Recipe(text, train, detector, replay_rule["quantile"], replay_rule["margin"], replay_rule["floor"])


def _digest(recipe: Recipe, tables: list[Table], rows: int) -> str:
    h = hashlib.sha256(json.dumps(sorted(recipe.train.items()), default=str).encode())
    for source in sorted(Path(scoring.__file__).parent.glob("*.py")):  # other training code: other models
        h.update(source.read_bytes())
    for t in tables:
        h.update(np.ascontiguousarray(t.select(list(INPUTS))[:rows]).tobytes())
    return h.hexdigest()[:20]


def trained(recipe: Recipe, tables: list[Table], rows: int) -> Bundle:
    """The recipe's model on the first `rows` rows of each table, from the cache or trained (and cached)."""
    path = CACHE / f"{_digest(recipe, tables, rows)}.tflite"
    if not path.exists():
        from edge_agent.scoring.train import TrainOptions, train

        options = TrainOptions(name="skab-cv", inputs=INPUTS, **recipe.train)
        bundle = train([t.select(list(INPUTS))[:rows] for t in tables], options, source="cv")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(bundle.data)
        tmp.replace(path)
    return load_bundle(path)


def with_detector(bundle: Bundle, recipe: Recipe) -> Bundle:
    """The bundle with the recipe's smoothing, exit ratio and minimum duration as its defaults."""
    meta = bundle.metadata
    # model_copy keeps what this bench does not set (a kind's score.params)
    score = meta.score.model_copy(update={k: v for k, v in recipe.detector.items() if k == "smoothing"})
    det = meta.detector.model_copy(update={k: v for k, v in recipe.detector.items() if k != "smoothing"})
    new = meta.model_copy(update={"score": score, "detector": det})
    return bundle_from_bytes(embed_metadata(bundle.data, new))


def replay_run(bundle: Bundle, recipe: Recipe, times: F64, data: F64, rows: int) -> ReplayResult:
    """`replay --calibrate-rows rows` with the recipe's threshold rule (and its exploratory floor)."""
    if not recipe.floor:
        return replay(bundle, times, data, calibrate_rows=rows, quantile=recipe.quantile, margin=recipe.margin)
    cal = calibrate(bundle, data[:rows], quantile=recipe.quantile, margin=recipe.margin)
    threshold = max(cal.metadata.threshold.value, recipe.floor * bundle.metadata.threshold.value)
    return replay(cal, times, data, threshold=threshold)


def score_runs(bundle: Bundle, recipe: Recipe, runs: list[tuple[Path, Table]], data_dir: Path, rows: int) -> list[Any]:
    """Replay each run with a calibration on its first `rows` rows; the labelled test parts (skab.FileResult)."""
    from skab import file_result  # bench/ is on sys.path when run as bench/skab.py

    bundle = with_detector(bundle, recipe)
    out = []
    for path, table in runs:
        result = replay_run(bundle, recipe, table.times, table.select(list(INPUTS)), rows)
        found = file_result(table, path.relative_to(data_dir), result.anomaly, rows)
        if found is not None:
            out.append(found)
    return out


def cross_validate(data_dir: Path, recipe: Recipe, *, folds: int, rows: int = 400) -> dict[str, Any]:
    """In-sample and K-fold-by-run figures of one recipe (metrics pooled as skab.summarise pools them)."""
    from skab import _natural, nab_metrics, outlier_metrics

    normal = read_table(data_dir / "anomaly-free" / "anomaly-free.csv")
    paths = sorted((data_dir / "valve1").glob("*.csv"), key=_natural)
    runs = [(p, read_table(p)) for p in paths]
    t0 = time.perf_counter()
    full = trained(recipe, [normal, *(t for _, t in runs)], rows)
    in_sample = score_runs(full, recipe, runs, data_dir, rows)
    held_out = []
    per_fold = []
    for k in range(folds):
        test = [r for i, r in enumerate(runs) if i % folds == k]
        train_tables = [normal, *(t for i, (_, t) in enumerate(runs) if i % folds != k)]
        fold = score_runs(trained(recipe, train_tables, rows), recipe, test, data_dir, rows)
        per_fold.append(outlier_metrics(fold))
        held_out += fold
    out: dict[str, Any] = {"recipe": recipe.text, "folds": folds, "sha256": full.sha256}
    for name, rs in (("in_sample", in_sample), ("cv", held_out)):
        out[name] = {k: round(v, 4) for k, v in {**outlier_metrics(rs), **nab_metrics(rs)}.items()}
    out["cv_fold_far"] = [round(m["far"], 2) for m in per_fold]
    # normal data the models never saw (anomaly-free after its first 400 rows), cut into runs as long as the
    # labelled ones, each calibrated on its own first rows: the false alarms of a fault-free run
    span = int(np.median([len(t.times) for _, t in runs]))
    detect = with_detector(full, recipe)
    times, data = normal.times[rows:], normal.select(list(INPUTS))[rows:]
    fp = n = 0
    for start in range(0, len(times) - span + 1, span):
        part = slice(start, start + span)
        fp += int(replay_run(detect, recipe, times[part], data[part], rows).anomaly[rows:].sum())
        n += span - rows
    out["normal_far_runs"] = round(100.0 * fp / n, 2)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def cv_table(results: list[dict[str, Any]]) -> str:
    """Markdown: per recipe, in-sample beside cross-validated F1 / FAR / MAR / NAB standard."""
    lines = [
        "| recipe | in-sample F1 | FAR, % | MAR, % | NAB std | CV F1 | CV FAR, % | CV MAR, % | CV NAB std "
        "| CV FAR per fold | anomaly-free runs FAR, % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        i, c = r["in_sample"], r["cv"]
        lines.append(
            f"| `{r['recipe'] or '(defaults)'}` | {i['f1']:.3f} | {i['far']:.2f} | {i['mar']:.2f} | "
            f"{i['nab_standard']:.1f} | **{c['f1']:.3f}** | **{c['far']:.2f}** | {c['mar']:.2f} | "
            f"{c['nab_standard']:.1f} | {' / '.join(f'{x:.1f}' for x in r['cv_fold_far'])} "
            f"| {r['normal_far_runs']:.2f} |"
        )
    return "\n".join(lines)
