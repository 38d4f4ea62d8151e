"""Training recipe (needs the `train` extra: tensorflow-cpu): CSV of normal operation → int8 model bundle.

A model of the options' kind (by default the dense autoencoder of scoring/autoencoder.py, whose
`fit` hook builds and fits it) over windows of normalised tags, trained with a fixed seed and deterministic
ops, then converted to a fully int8 TFLite model whose representative dataset is drawn from the
training windows. Normalisation and threshold are stored in the bundle's metadata.

The threshold comes from windows the model was not fitted on: the last `holdout` fraction of each
run's rows (of each `segment_rows` slice, per run) is held out, the model is fitted on the rest and
the threshold (quantile × margin) is taken over the held-out windows' scores. The held-out rows are
one contiguous tail block per run, not windows drawn at random: neighbouring windows share all but
one row, so a random pick would put near-copies of training windows into the hold-out and give the
same too-low threshold as the training windows themselves. Windows are cut inside each block, so no
window holds rows of both. `holdout=0` scores the training windows, as before (a too-low threshold).

Normalisation is either global (one mean and scale over all the training data: for a model that is
used with the normalisation it ships with) or per run (each run, or each `segment_rows` slice of
it, standardised on its own: for a model that is calibrated on each machine before use, as
`calibrate`, `replay --calibrate-rows` and startup calibration do). Per-run training shows the
model data in the coordinates it will see after calibration, so a machine's operating point (levels
that differ between runs) is not learnt as normal variation to be reconstructed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.base import plugin_for
from edge_agent.scoring.bundle import (
    Bundle,
    BundleMetadata,
    DetectorSpec,
    ModelError,
    Normalisation,
    ScoreSpec,
    ThresholdSpec,
    bundle_from_bytes,
    embed_metadata,
    now_iso,
)
from edge_agent.scoring.calibrate import (
    SCALINGS,
    calibrate,
    fit_normalisation,
    normal_scores,
    rolling_mean,
    score_series,
    sliding_windows,
    threshold_of,
)
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.runtime import ModelRuntime

F64 = npt.NDArray[np.float64]
Normalise = Literal["global", "per-run"]


@dataclass(frozen=True)
class TrainOptions:
    """Everything that determines the model: the same options and data give the same file."""

    name: str
    inputs: tuple[str, ...]
    window: int = 16
    sample_interval: float = 1.0
    hidden: int = 32
    bottleneck: int = 8
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    dtype: Literal["int8", "float32"] = "int8"
    quantile: float = 0.99
    margin: float = 1.5
    smoothing: int = 1
    exit_ratio: float = 0.8
    min_duration: float = 5.0
    description: str = ""
    normalise: Normalise = "global"
    # per-run: cut runs into slices of this many rows, each standardised on its own (0: whole runs)
    segment_rows: int = 0
    kind: str = "reconstruction_mse"  # the model kind (base.SCORERS) whose `fit` hook builds and fits the model
    # the fraction of each run's rows (a tail block) the model is not fitted on; the threshold comes from them
    holdout: float = 0.2
    scaling: str = "standard"  # standard (mean/std) or robust (median/IQR): calibrate.fit_normalisation
    # > 0: later calibrations keep the threshold ≥ this × the trained one (bench/skab.py --cv: fewer false
    # alarms after a quiet calibration stretch, models/skab/NOTES.md)
    threshold_floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be at least 0 and below 1, not {self.holdout!r}")
        if self.normalise not in ("global", "per-run"):
            raise ValueError(f"normalise must be 'global' or 'per-run', not {self.normalise!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, not {self.scaling!r}")
        if self.segment_rows < 0:
            raise ValueError("segment_rows must be 0 (whole runs) or positive")
        if not 0 <= self.threshold_floor < 100:
            raise ValueError("threshold_floor must be 0 (none) or a positive ratio below 100")
        try:
            plugin_for(self.kind)
        except ModelError as exc:
            raise ValueError(str(exc)) from None


def _tf() -> Any:
    # before the import, or TensorFlow's C++ start-up lines (oneDNN, CPU features) are already out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with stdout_to_stderr():
            import tensorflow as tf
    except ImportError as exc:
        raise ModelError("training needs TensorFlow: pip install 'edge-agent[train]'") from exc
    tf.get_logger().setLevel("ERROR")
    return tf


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what TensorFlow prints (Keras's SavedModel summary, XNNPACK and converter lines) to stderr.

    Both levels: Python's sys.stdout and file descriptor 1, which the C++ parts write to directly; a
    caller's stdout then holds only what edge-agent prints (a bundle path, a threshold: data).
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def runs_of(series: list[F64], options: TrainOptions) -> list[F64]:
    """The runs that are standardised on their own: whole runs, or their `segment_rows` slices (a short tail joins
    the slice before it)."""
    if options.normalise == "global" or options.segment_rows <= 0:
        return list(series)
    n = options.segment_rows
    out = []
    for s in series:
        starts = list(range(0, max(len(s) - n, 0) + 1, n))
        for i, start in enumerate(starts):
            out.append(s[start : start + n] if i + 1 < len(starts) else s[start:])
    return out


def training_windows(series: list[F64], options: TrainOptions) -> npt.NDArray[np.float32]:
    """Normalised windows of every run (a window never spans two runs)."""
    if options.normalise == "global":
        mean, scale = fit_normalisation(np.concatenate(series), scaling=options.scaling)
        mean_a, scale_a = np.asarray(mean), np.asarray(scale)
        parts = [sliding_windows((s - mean_a) / scale_a, options.window) for s in series]
    else:
        parts = []
        for run in runs_of(series, options):
            if len(run) < options.window + 10:
                continue  # too short to calibrate on, as calibrate() would refuse it
            m, sc = fit_normalisation(run, scaling=options.scaling)
            parts.append(sliding_windows((run - np.asarray(m)) / np.asarray(sc), options.window))
    if not parts:
        raise ValueError(f"no run has the {options.window + 10} rows a window of {options.window} needs")
    return np.nan_to_num(np.concatenate(parts))


def split_holdout(series: list[F64], options: TrainOptions) -> tuple[list[F64], list[F64]]:
    """Each run (per run: each slice) cut into the rows the model is fitted on and its held-out tail block."""
    runs = runs_of(series, options)
    if options.holdout <= 0:
        return runs, []
    cuts = [len(r) - round(len(r) * options.holdout) for r in runs]
    return [r[:c] for r, c in zip(runs, cuts, strict=True)], [r[c:] for r, c in zip(runs, cuts, strict=True)]


def held_out_scores(bundle: Bundle, held: list[tuple[Normalisation, F64]]) -> tuple[F64, int]:
    """The detector's scores of each held-out block under the normalisation its model saw, and the rows scored."""
    meta = bundle.metadata
    runtime = ModelRuntime(bundle)  # one interpreter; only the normalisation differs between blocks
    out, rows = [], 0
    for norm, block in held:
        if len(block) < meta.window:
            continue
        staged = bundle_from_bytes(embed_metadata(bundle.data, meta.model_copy(update={"normalisation": norm})))
        scores = score_series(WindowScorer(staged, runtime=runtime), block)
        out.append(rolling_mean(scores[np.isfinite(scores)], meta.score.smoothing))
        rows += len(block)
    scores = np.concatenate(out) if out else np.empty(0)
    if scores.size == 0:
        raise ValueError(
            f"the held-out tails (holdout {meta.training.get('holdout')}) hold no scorable window of "
            f"{meta.window} rows: give longer runs, a larger --holdout, or --holdout 0"
        )
    return scores, rows


def _held_out_threshold(
    bundle: Bundle, held: list[tuple[Normalisation, F64]], options: TrainOptions, source: str
) -> Bundle:
    """Threshold (quantile × margin) from the scores of the held-out tail blocks only."""
    scores, rows = held_out_scores(bundle, held)
    per_run = ", per run" if options.normalise == "per-run" else ""
    threshold = ThresholdSpec(
        value=threshold_of(scores, options.quantile, options.margin),
        method=f"quantile×margin, held-out{per_run}",
        quantile=options.quantile,
        margin=options.margin,
        calibrated_on=f"held-out last {options.holdout:g} of each run of {source or 'the training data'}",
        rows=rows,
        calibrated_at=now_iso(),
    )
    training = {**bundle.metadata.training, "holdout_rows": rows, "holdout_windows": int(scores.size)}
    meta = bundle.metadata.model_copy(update={"threshold": threshold, "training": training})
    return bundle_from_bytes(embed_metadata(bundle.data, meta))


def _per_run_threshold(bundle: Bundle, series: list[F64], options: TrainOptions, source: str) -> Bundle:
    """Threshold from every run scored under its own normalisation (as calibration on each machine will)."""
    scores = [normal_scores(bundle, run)[1] for run in runs_of(series, options) if len(run) >= options.window + 10]
    value = threshold_of(np.concatenate(scores), options.quantile, options.margin)
    rows = sum(len(s) for s in series)
    threshold = ThresholdSpec(
        value=value,
        method="quantile×margin, per run",
        quantile=options.quantile,
        margin=options.margin,
        calibrated_on=source or "training data",
        rows=rows,
        calibrated_at=now_iso(),
    )
    meta = bundle.metadata.model_copy(update={"threshold": threshold})
    return bundle_from_bytes(embed_metadata(bundle.data, meta))


def _convert(tf: Any, model: Any, windows: npt.NDArray[np.float32], options: TrainOptions) -> bytes:
    """The Keras model as TFLite: fully int8 (representative windows from the training set) or float32."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if options.dtype == "int8":
        rng = np.random.default_rng(options.seed)
        picks = rng.choice(len(windows), size=min(500, len(windows)), replace=False)

        def representative() -> Any:
            for i in picks:
                yield [windows[i : i + 1].astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with stdout_to_stderr():
        return bytes(converter.convert())


def _held_blocks(
    fit_parts: list[F64], held: list[F64], options: TrainOptions, norm: Normalisation
) -> list[tuple[Normalisation, F64]]:
    """Each held-out block with the normalisation the model saw its run in: the global one, or its run's fit part's."""
    if options.normalise == "global":
        return [(norm, h) for h in held]
    pairs = []
    for f, h in zip(fit_parts, held, strict=True):
        if len(f) >= options.window + 10:  # the runs training_windows used
            mean, scale = fit_normalisation(f, scaling=options.scaling)
            pairs.append((Normalisation(mean=mean, scale=scale, scaling=options.scaling), h))
    return pairs


def train(series: list[F64], options: TrainOptions, *, source: str = "") -> Bundle:
    """Train on one or more runs (each rows × inputs, normal operation) and return a calibrated bundle."""
    fit = plugin_for(options.kind).fit
    if fit is None:
        raise ModelError(f"model kind {options.kind} has no training recipe")
    tf = _tf()
    tf.keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    data = np.concatenate(series)
    fit_parts, held = split_holdout(series, options)
    mean, scale = fit_normalisation(np.concatenate(fit_parts), scaling=options.scaling)
    norm = Normalisation(mean=mean, scale=scale, scaling=options.scaling)
    windows = training_windows(fit_parts, options)
    with stdout_to_stderr():
        trained = fit(tf, windows, options)
    meta = BundleMetadata(
        name=options.name,
        description=options.description,
        inputs=list(options.inputs),
        window=options.window,
        sample_interval=options.sample_interval,
        normalisation=norm,
        score=ScoreSpec(kind=options.kind, smoothing=options.smoothing, params=trained.score_params),
        detector=DetectorSpec(exit_ratio=options.exit_ratio, min_duration=options.min_duration),
        threshold=ThresholdSpec(value=1.0),  # replaced by the calibration below
        training={
            "source": source,
            "rows": len(data),
            "runs": len(series),
            "windows": len(windows),
            # only when set: a bundle trained as before (no hold-out) keeps its bytes, so the shipped ones rebuild
            **({"holdout": options.holdout} if options.holdout > 0 else {}),
            "seed": options.seed,
            "epochs": options.epochs,
            "hidden": options.hidden,
            "bottleneck": options.bottleneck,
            "dtype": options.dtype,
            "final_loss": trained.final_loss,
            **(
                {"normalise": options.normalise, "segment_rows": options.segment_rows}
                if options.normalise != "global"
                else {}
            ),
            "tensorflow": tf.__version__,
            "architecture": trained.architecture,
        },
        created=now_iso(),
    )
    bundle = bundle_from_bytes(embed_metadata(_convert(tf, trained.model, windows, options), meta))
    if options.holdout > 0:
        blocks = _held_blocks(fit_parts, held, options, norm)
        own = plugin_for(options.kind).calibrate
        if own is not None:  # the kind's own calibrated parts (an ensemble's member thresholds), held-out too
            bundle = own(bundle, lambda b: held_out_scores(b, blocks)[0], options.quantile, options.margin)
        bundle = _held_out_threshold(bundle, blocks, options, source)
    elif options.normalise == "per-run":
        # the stored normalisation (all the data) is a fallback: this model is meant to be calibrated on its machine
        bundle = _per_run_threshold(bundle, series, options, source)
    else:
        bundle = calibrate(
            bundle, data, quantile=options.quantile, margin=options.margin, source=source or "training data"
        )
    return with_floor(bundle, options.threshold_floor) if options.threshold_floor else bundle


def with_floor(bundle: Bundle, ratio: float) -> Bundle:
    """The bundle with `threshold.floor` = ratio × its threshold (6 digits, as thresholds are stored)."""
    threshold = bundle.metadata.threshold
    floor = float(f"{threshold.value * ratio:.6g}")
    final = bundle.metadata.model_copy(update={"threshold": threshold.model_copy(update={"floor": floor})})
    return bundle_from_bytes(embed_metadata(bundle.data, final))
