"""Model kind `conv_reconstruction_mse`: registered with a training hook, the dense kind's arithmetic on a conv model.

The fixture tests/fixtures/pump-conv-i8.tflite is a small int8 conv bundle (tests/fixtures/README.md says how it
was made); the training hook itself needs TensorFlow and is tested in test_train_tf.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.scoring import autoencoder, conv_autoencoder
from edge_agent.scoring.base import SCORERS
from edge_agent.scoring.bundle import load_bundle
from edge_agent.scoring.calibrate import calibrate, score_series
from edge_agent.scoring.detector import WindowScorer
from edge_agent.scoring.runtime import ModelRuntime

CONV = Path(__file__).parents[1] / "fixtures" / "pump-conv-i8.tflite"


def plant(rows: int, seed: int) -> np.ndarray:
    """Rows × inputs around the fixture's normal levels, with its normal spread."""
    meta = load_bundle(CONV).metadata
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    return mean + 0.3 * scale * np.random.default_rng(seed).standard_normal((rows, len(mean)))


def test_the_kind_is_registered_with_a_training_hook_and_the_reconstruction_arithmetic() -> None:
    plugin = SCORERS["conv_reconstruction_mse"]
    assert plugin is conv_autoencoder.PLUGIN and plugin.fit is conv_autoencoder.fit_conv
    assert plugin.scorer is autoencoder.ReconstructionScorer  # imported, not copied
    assert plugin.output_shape is autoencoder.PLUGIN.output_shape


def test_the_fixture_is_a_full_int8_conv_bundle_scored_as_mean_squared_error() -> None:
    bundle = load_bundle(CONV)
    meta = bundle.metadata
    assert meta.score.kind == "conv_reconstruction_mse" and meta.score.params == {}
    assert meta.training["architecture"].startswith("temporal conv autoencoder")
    assert meta.threshold.method == "quantile×margin, held-out" and meta.training["holdout"] == 0.2
    runtime = ModelRuntime(bundle)
    tensors = runtime.describe()
    assert tensors["input"]["dtype"] == tensors["output"]["dtype"] == "int8"
    values = plant(40, 1)[None, : meta.window].astype(np.float32).repeat(3, axis=0)
    values[1, :, 2] += 5 * np.asarray(meta.normalisation.scale)[2]  # one tag far off in the second window
    scorer = WindowScorer(bundle, runtime=ModelRuntime(bundle))
    scores, shares = scorer.score(values, np.ones(values.shape, bool))
    x = (values - np.asarray(meta.normalisation.mean, np.float32)) / np.asarray(meta.normalisation.scale, np.float32)
    err = (x.astype(np.float64) - runtime.run(x.copy())) ** 2
    np.testing.assert_allclose(scores, err.mean(axis=(1, 2)), rtol=1e-4)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert scores[1] > 5 * scores[0] and int(np.argmax(shares[1])) == 2  # the off tag, and it is named


def test_calibrating_a_conv_bundle_keeps_its_kind() -> None:
    bundle = load_bundle(CONV)
    normal = plant(300, 2)
    new = calibrate(bundle, normal, quantile=0.95, source="test")
    assert new.metadata.score == bundle.metadata.score and new.metadata.threshold.base_sha256 == bundle.sha256
    scores = score_series(WindowScorer(new), normal)
    assert new.metadata.threshold.value == pytest.approx(np.quantile(scores, 0.95) * 1.5, rel=1e-5)
