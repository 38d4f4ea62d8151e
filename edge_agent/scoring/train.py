"""Training recipe (needs the `train` extra: tensorflow-cpu): CSV of normal operation → int8 model bundle.

A dense autoencoder over windows of normalised tags, trained with a fixed seed and deterministic
ops, then converted to a fully int8 TFLite model whose representative dataset is drawn from the
training windows. Normalisation and threshold are calibrated on the training data and stored in
the bundle's metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

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
from edge_agent.scoring.calibrate import calibrate, fit_normalisation, sliding_windows

F64 = npt.NDArray[np.float64]


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


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ModelError("training needs TensorFlow: pip install 'edge-agent[train]'") from exc
    return tf


def train(series: list[F64], options: TrainOptions, *, source: str = "") -> Bundle:
    """Train on one or more runs (each rows × inputs, normal operation) and return a calibrated bundle."""
    tf = _tf()
    tf.keras.utils.set_random_seed(options.seed)
    tf.config.experimental.enable_op_determinism()
    data = np.concatenate(series)
    mean, scale = fit_normalisation(data)
    mean_a, scale_a = np.asarray(mean), np.asarray(scale)
    # windows never span two runs
    windows = np.concatenate([sliding_windows((s - mean_a) / scale_a, options.window) for s in series])
    windows = np.nan_to_num(windows)
    n_in = len(options.inputs)
    shape = (options.window, n_in)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=shape),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(options.hidden, activation="relu"),
            tf.keras.layers.Dense(options.bottleneck, activation="relu"),
            tf.keras.layers.Dense(options.hidden, activation="relu"),
            tf.keras.layers.Dense(options.window * n_in),
            tf.keras.layers.Reshape(shape),
        ]
    )
    model.compile(optimizer=tf.keras.optimizers.Adam(options.learning_rate), loss="mse")
    history = model.fit(windows, windows, epochs=options.epochs, batch_size=options.batch_size, shuffle=True, verbose=0)
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
        score=ScoreSpec(smoothing=options.smoothing),
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
            "final_loss": float(history.history["loss"][-1]),
            "tensorflow": tf.__version__,
            "architecture": f"dense autoencoder {options.window * n_in}-{options.hidden}-{options.bottleneck}-"
            f"{options.hidden}-{options.window * n_in}",
        },
        created=now_iso(),
    )
    bundle = bundle_from_bytes(embed_metadata(tflite, meta))
    return calibrate(bundle, data, quantile=options.quantile, margin=options.margin, source=source or "training data")
