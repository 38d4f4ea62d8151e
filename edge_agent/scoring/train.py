"""Training recipe (needs the `train` extra: tensorflow-cpu): CSV of normal operation → int8 model bundle.

A model of the options' kind (by default the dense autoencoder of scoring/autoencoder.py, whose
`fit` hook builds and fits it) over windows of normalised tags, trained with a fixed seed and deterministic
ops, then converted to a fully int8 TFLite model whose representative dataset is drawn from the
training windows. Normalisation and threshold are calibrated on the training data and stored in
the bundle's metadata.

Normalisation is either global (one mean and scale over all the training data: for a model that is
used with the normalisation it ships with) or per run (each run, or each `segment_rows` slice of
it, standardised on its own: for a model that is calibrated on each machine before use, as
`calibrate`, `replay --calibrate-rows` and startup calibration do). Per-run training shows the
model data in the coordinates it will see after calibration, so a machine's operating point (levels
that differ between runs) is not learnt as normal variation to be reconstructed.
"""

from __future__ import annotations

import os
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
from edge_agent.scoring.calibrate import calibrate, fit_normalisation, normal_scores, sliding_windows, threshold_of

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

    def __post_init__(self) -> None:
        if self.normalise not in ("global", "per-run"):
            raise ValueError(f"normalise must be 'global' or 'per-run', not {self.normalise!r}")
        if self.segment_rows < 0:
            raise ValueError("segment_rows must be 0 (whole runs) or positive")
        try:
            plugin_for(self.kind)
        except ModelError as exc:
            raise ValueError(str(exc)) from None


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ModelError("training needs TensorFlow: pip install 'edge-agent[train]'") from exc
    return tf


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
        mean, scale = fit_normalisation(np.concatenate(series))
        mean_a, scale_a = np.asarray(mean), np.asarray(scale)
        parts = [sliding_windows((s - mean_a) / scale_a, options.window) for s in series]
    else:
        parts = []
        for run in runs_of(series, options):
            if len(run) < options.window + 10:
                continue  # too short to calibrate on, as calibrate() would refuse it
            m, sc = fit_normalisation(run)
            parts.append(sliding_windows((run - np.asarray(m)) / np.asarray(sc), options.window))
    if not parts:
        raise ValueError(f"no run has the {options.window + 10} rows a window of {options.window} needs")
    return np.nan_to_num(np.concatenate(parts))


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


def train(series: list[F64], options: TrainOptions, *, source: str = "") -> Bundle:
    """Train on one or more runs (each rows × inputs, normal operation) and return a calibrated bundle."""
    fit = plugin_for(options.kind).fit
    if fit is None:
        raise ModelError(f"model kind {options.kind} has no training recipe")
    tf = _tf()
    tf.keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    data = np.concatenate(series)
    mean, scale = fit_normalisation(data)
    windows = training_windows(series, options)
    trained = fit(tf, windows, options)
    model = trained.model
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
    tflite = converter.convert()
    meta = BundleMetadata(
        name=options.name,
        description=options.description,
        inputs=list(options.inputs),
        window=options.window,
        sample_interval=options.sample_interval,
        normalisation=Normalisation(mean=mean, scale=scale),
        score=ScoreSpec(kind=options.kind, smoothing=options.smoothing, params=trained.score_params),
        detector=DetectorSpec(exit_ratio=options.exit_ratio, min_duration=options.min_duration),
        threshold=ThresholdSpec(value=1.0),  # replaced by the calibration below
        training={
            "source": source,
            "rows": len(data),
            "runs": len(series),
            "windows": len(windows),
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
    bundle = bundle_from_bytes(embed_metadata(tflite, meta))
    if options.normalise == "per-run":
        # the stored normalisation (all the data) is a fallback: this model is meant to be calibrated on its machine
        return _per_run_threshold(bundle, series, options, source)
    return calibrate(bundle, data, quantile=options.quantile, margin=options.margin, source=source or "training data")
